"""Real `dvc repro` of prepare -> teacher -> teacher_outputs -> distill on a tiny model and fixture data."""

import json

import numpy as np
import optuna
import pandas as pd
import pytest
from tiny import NEGATIVE, POSITIVE, make_reviews, make_tiny_model

pytestmark = pytest.mark.slow

TINY = {
    "max_length": 32,
    "prepare.source": "reviews.csv",
    "prepare.min_examples_per_class": 3,
    "teacher.epochs": 6,
    "teacher.batch_size": 16,
    "teacher.learning_rate": 3.0e-3,
    "teacher.checkpoint_every_steps": 5,
    "teacher_outputs.batch_size": 16,
    "distill.n_trials": 2,
    "distill.trial_epochs": 2,
    "distill.eval_every_steps": 4,
    "distill.final_epochs": 2,
    "distill.batch_size": 16,
    "distill.trial_train_examples": 0,
    "distill.search.learning_rate": [1.0e-3, 5.0e-3],
    "distill.search.student_layers": [1, 2],  # a depth search on the 3-layer tiny teacher: one trial per depth
    "distill.choose.min_speedup": 0,  # no timing decides a test
    "distill.latency_calls": 10,
    "distill.general_texts": 50,
    "long_texts.min_words": 12,  # the fixture reviews are 4-8 words: documents of 2-3 of them
}


def tiny_pipeline(repo_copy):
    make_reviews(n_movies=60).to_csv(repo_copy.path / "reviews.csv", index=False)
    make_tiny_model(repo_copy.path / "tiny-teacher", layers=3)
    repo_copy.set_params({**TINY, "teacher.model": "tiny-teacher"})


def test_training_stages_run_cache_and_resume(repo_copy):
    tiny_pipeline(repo_copy)
    first = repo_copy.dvc("repro", "distill")
    for stage in ("prepare", "teacher", "teacher_outputs", "distill"):
        assert f"Running stage '{stage}'" in first.stdout

    teacher = json.loads((repo_copy.path / "metrics/teacher.json").read_text())
    distill = json.loads((repo_copy.path / "metrics/distill.json").read_text())
    assert teacher["val_accuracy"] > 0.8 and teacher["layers"] == 3
    # the depth was chosen from a frontier of both depths, and the stage says why
    choice, rows = distill["choice"], distill["frontier"]
    assert choice["searched"] and sorted(r["student_layers"] for r in rows) == [1, 2]
    assert [r["trial"] for r in rows if r["chosen"]] == [choice["trial"]] and choice["reason"]
    assert distill["student_layers"] == choice["student_layers"] in (1, 2)
    assert distill["student_parameters"] < teacher["parameters"] and distill["teacher_latency_ms"] > 0
    assert "why: " in first.stdout + first.stderr
    # the table beside the frontier's figure is the frontier the report records, row for row
    frontier_csv = pd.read_csv(repo_copy.path / "plots/distill/frontier.csv")
    assert frontier_csv.to_dict("records") == rows  # floats written as repr: they read back exactly
    assert (repo_copy.path / "plots/distill/frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert distill["trials"] == 2 and set(distill["best_params"]) >= {"temperature", "alpha", "learning_rate"}
    assert distill["val_accuracy"] > 0.7
    student = repo_copy.path / "models/student"
    assert (student / "model.safetensors").exists() and (student / "distilops.json").exists()
    assert not any((repo_copy.path / "checkpoints").rglob("*.pt"))  # finished runs leave no checkpoints

    # A distill-only change as a DVC experiment (README: parameter sweeps): the teacher and its cached
    # outputs are reused, and the study, kept outside DVC's outputs, resumes instead of starting again.
    second = repo_copy.dvc("exp", "run", "-n", "three-trials", "-S", "distill.n_trials=3", "distill")
    assert "Running stage 'distill'" in second.stdout
    for stage in ("prepare", "teacher", "teacher_outputs"):
        assert f"Running stage '{stage}'" not in second.stdout
    assert "2 trial(s) done, 1 to run" in second.stdout
    study = optuna.load_study(study_name=distill["study_name"],
                              storage=f"sqlite:///{repo_copy.path / 'optuna/distill.db'}")
    assert len(study.trials) == 3
    shown = json.loads(repo_copy.dvc("exp", "show", "--json").stdout)
    experiments = [exp for row in shown for exp in (row.get("experiments") or [])]
    (experiment,) = [e for e in experiments if e["name"] == "three-trials"]
    revision = experiment["revs"][0]["data"]
    assert revision["params"]["params.yaml"]["data"]["distill"]["n_trials"] == 3

    third = repo_copy.dvc("repro", "distill")
    assert "Running stage" not in third.stdout


def test_tune_workers_share_a_postgres_study_and_a_killed_workers_trial_is_retried(repo_copy, postgres):
    """What the Kubernetes Indexed Job does: two `distilops tune` workers fill one study in PostgreSQL
    (the documented postgresql:// URL). One is killed (SIGKILL) mid-trial: its heartbeat stops, the
    other worker fails that trial and runs it again with the same parameters, and the study completes
    with nothing lost. The distill stage then runs no trial, only the final student."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    tiny_pipeline(repo_copy)
    n_trials = 6
    repo_copy.set_params({"distill.n_trials": n_trials, "distill.pruner_startup_trials": n_trials,
                          "distill.trial_epochs": 6, "distill.heartbeat_seconds": 1})
    repo_copy.dvc("repro", "teacher_outputs")
    storage = postgres.create_database("optuna_workers")
    repo_copy.env["DISTILOPS_OPTUNA_STORAGE"] = storage  # as the Job's Secret sets it
    env = repo_copy.env
    distilops = str(Path(sys.executable).parent / "distilops")
    # One storage for all the polling: a URL string would build a new engine and connection pool per call,
    # and a slow machine polling every 0.2 s runs PostgreSQL out of connections ("too many clients").
    # Made before the workers start, so the schema exists before they race to create it.
    watcher = optuna.storages.RDBStorage(storage)
    workers = [subprocess.Popen([distilops, "tune", "--worker", str(i)], cwd=repo_copy.path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        # Kill worker 1 once it is inside a trial (each trial records the worker running it).
        deadline, killed = time.monotonic() + 300, None
        while killed is None and time.monotonic() < deadline and workers[1].poll() is None:
            names = optuna.get_all_study_names(watcher)
            trials = optuna.load_study(study_name=names[0], storage=watcher).trials if names else []
            running = [t for t in trials
                       if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("worker") == 1]
            if running:
                workers[1].send_signal(signal.SIGKILL)
                killed = running[0]
            time.sleep(0.2)
        assert killed is not None, "worker 1 never started a trial:\n" + workers[1].communicate(timeout=60)[0][-3000:]
        output = workers[0].communicate(timeout=600)[0]
        assert workers[0].returncode == 0, output[-4000:]
        (name,) = optuna.get_all_study_names(watcher)
        trials = optuna.load_study(study_name=name, storage=watcher).trials
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
        watcher.engine.dispose()

    assert trials[killed.number].state == optuna.trial.TrialState.FAIL  # failed by the heartbeat, not left running
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params and retry.state == optuna.trial.TrialState.COMPLETE
    finished = [t for t in trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    assert len(finished) == n_trials and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len({tuple(sorted(t.params.items())) for t in finished}) == n_trials  # own seeds: no repeats

    result = repo_copy.dvc("repro", "distill")
    assert "0 to run" in result.stdout
    assert json.loads((repo_copy.path / "metrics/distill.json").read_text())["trials"] == len(trials)


def test_transfer_texts_are_labelled_by_the_teacher_and_distilled(repo_copy):
    """teacher_outputs.transfer_texts: the teacher labels unlabelled texts once (a labelled training text among
    them is dropped), and the student trains on them beside the labelled data, on soft targets only."""
    tiny_pipeline(repo_copy)
    train_text = pd.read_csv(repo_copy.path / "reviews.csv")["text"].iloc[0]
    # unlabelled, unlike any training text (the movie token), and telling the teacher different things: 15 fresh-
    # sounding, 15 rotten-sounding, so their logits differ text by text
    texts = [f"{('the', 'a')[i % 2]} {(POSITIVE if i < 15 else NEGATIVE)[i % 8]} movie m{i}" for i in range(30)]
    texts += [train_text]
    (repo_copy.path / "transfer.txt").write_text("\n".join(texts) + "\n")
    repo_copy.set_params({"teacher_outputs.transfer_texts": ["transfer.txt"], "distill.n_trials": 1,
                          "distill.search.student_layers": [0, 0]})  # one trial: depth fixed
    repo_copy.dvc("repro", "distill")
    cached = (repo_copy.path / "data/teacher_outputs/transfer_texts.txt").read_text().splitlines()
    assert len(cached) == 30 and train_text not in cached
    meta = json.loads((repo_copy.path / "data/teacher_outputs/meta.json").read_text())
    assert meta["rows"]["transfer"] == 30 and meta["transfer_sha256"]
    distill = json.loads((repo_copy.path / "metrics/distill.json").read_text())
    assert distill["transfer_examples"] == 30 and distill["val_accuracy"] > 0.6

    # The cached soft targets are the teacher's logits on those very texts (read here the way evaluate reads a
    # model, not through the stage's code), and the student trains on them with no label.
    from distilops.config import DistillConfig, load_section
    from distilops.pipeline.losses import UNLABELLED
    from distilops.pipeline.torch_model import open_classifier
    from distilops.pipeline.tuning import load_inputs

    root = repo_copy.path
    soft = np.load(root / "data/teacher_outputs/transfer_logits.npy")
    assert soft.shape == (30, 2) and np.abs(soft - soft[::-1]).max() > 0.1  # rows in another order would show
    np.testing.assert_allclose(soft, open_classifier(root / "models/teacher").predict_logits_batched(cached), atol=1e-4)
    train = load_inputs(load_section(DistillConfig, root / "params.yaml"), root / "data/prepared",
                        root / "models/teacher", root / "data/teacher_outputs").data["train"]
    unlabelled = train.labels == UNLABELLED
    assert unlabelled.sum() == 30 and set(train.labels[~unlabelled].tolist()) <= {0, 1}
    np.testing.assert_array_equal(train.teacher_logits[unlabelled], soft)

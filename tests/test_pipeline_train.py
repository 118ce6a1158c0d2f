"""Real `dvc repro` of prepare -> teacher -> teacher_outputs -> distill on a tiny model and fixture data."""

import json

import optuna
import pandas as pd
import pytest
from tiny import make_reviews, make_tiny_model

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
    "long_texts.min_words": 12,  # the fixture reviews are 4-8 words: documents of 2-3 of them
}


def tiny_pipeline(repo_copy):
    make_reviews(n_movies=60).to_csv(repo_copy.path / "reviews.csv", index=False)
    make_tiny_model(repo_copy.path / "tiny-teacher", layers=2)
    repo_copy.set_params({**TINY, "teacher.model": "tiny-teacher"})


def test_training_stages_run_cache_and_resume(repo_copy):
    tiny_pipeline(repo_copy)
    first = repo_copy.dvc("repro", "distill")
    for stage in ("prepare", "teacher", "teacher_outputs", "distill"):
        assert f"Running stage '{stage}'" in first.stdout

    teacher = json.loads((repo_copy.path / "metrics/teacher.json").read_text())
    distill = json.loads((repo_copy.path / "metrics/distill.json").read_text())
    assert teacher["val_accuracy"] > 0.8 and teacher["layers"] == 2
    assert distill["student_layers"] == 1 and distill["student_parameters"] < teacher["parameters"]
    assert distill["trials"] == 2 and set(distill["best_params"]) >= {"temperature", "alpha", "learning_rate"}
    assert distill["val_accuracy"] > 0.7
    student = repo_copy.path / "models/student"
    assert (student / "model.safetensors").exists() and (student / "distilops.json").exists()
    assert not any((repo_copy.path / "checkpoints").rglob("*.pt"))  # finished runs leave no checkpoints

    # A distill-only change: the teacher and its cached outputs are reused, the study resumes.
    repo_copy.set_params({"distill.n_trials": 3})
    second = repo_copy.dvc("repro", "distill")
    assert "Running stage 'distill'" in second.stdout
    for stage in ("prepare", "teacher", "teacher_outputs"):
        assert f"Running stage '{stage}'" not in second.stdout
    assert "2 trial(s) done, 1 to run" in second.stdout
    study = optuna.load_study(study_name=distill["study_name"],
                              storage=f"sqlite:///{repo_copy.path / 'optuna/distill.db'}")
    assert len(study.trials) == 3

    third = repo_copy.dvc("repro", "distill")
    assert "Running stage" not in third.stdout


def test_tune_workers_share_one_study_then_distill_only_trains(repo_copy):
    """What the Kubernetes Indexed Job does, with SQLite in place of PostgreSQL: two workers fill one
    study up to n_trials; the distill stage then runs no trial, only the final student."""
    import subprocess
    import sys
    from pathlib import Path

    tiny_pipeline(repo_copy)
    repo_copy.set_params({"distill.n_trials": 4, "distill.pruner_startup_trials": 4})
    repo_copy.dvc("repro", "teacher_outputs")
    distilops = str(Path(sys.executable).parent / "distilops")
    workers = [subprocess.Popen([distilops, "tune", "--worker", str(i)], cwd=repo_copy.path, env=repo_copy.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(out[-4000:] for out in outputs)

    storage = f"sqlite:///{repo_copy.path / 'optuna/distill.db'}"
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) >= 4  # a worker may finish the trial it started as the other reached the total
    assert len({tuple(sorted(t.params.items())) for t in finished}) == len(finished)  # own seeds: no repeats

    result = repo_copy.dvc("repro", "distill")
    assert "0 to run" in result.stdout
    assert json.loads((repo_copy.path / "metrics/distill.json").read_text())["trials"] == len(trials)


def test_transfer_texts_are_labelled_by_the_teacher_and_distilled(repo_copy):
    """teacher_outputs.transfer_texts: the teacher labels unlabelled texts once (a labelled training text among
    them is dropped), and the student trains on them beside the labelled data, on soft targets only."""
    tiny_pipeline(repo_copy)
    train_text = pd.read_csv(repo_copy.path / "reviews.csv")["text"].iloc[0]
    texts = [f"an unlabelled sentence number {i} about nothing much" for i in range(30)] + [train_text]
    (repo_copy.path / "transfer.txt").write_text("\n".join(texts) + "\n")
    repo_copy.set_params({"teacher_outputs.transfer_texts": ["transfer.txt"], "distill.n_trials": 1})
    repo_copy.dvc("repro", "distill")
    cached = (repo_copy.path / "data/teacher_outputs/transfer_texts.txt").read_text().splitlines()
    assert len(cached) == 30 and train_text not in cached
    meta = json.loads((repo_copy.path / "data/teacher_outputs/meta.json").read_text())
    assert meta["rows"]["transfer"] == 30 and meta["transfer_sha256"]
    distill = json.loads((repo_copy.path / "metrics/distill.json").read_text())
    assert distill["transfer_examples"] == 30 and distill["val_accuracy"] > 0.6

"""Training on several processes (pipeline/distributed.py): 2 gloo processes on the CPU against 1.

The slow tests run real torchrun groups (tests/ddp_train.py, and the DVC stages); the others check the pieces
in-process: the batch shares, the single-process path starting nothing, and bad input refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import load_stage
from test_pipeline_train import TINY
from tiny import make_reviews, make_tiny_model

from distilops.config import Distributed
from distilops.errors import ConfigError, SettingError
from distilops.pipeline import distributed
from distilops.pipeline.batching import length_grouped_batches, shard_batches
from distilops.stage import run_stage

HERE = Path(__file__).parent


# --- in-process -----------------------------------------------------------------------------------------------


def test_each_global_batch_is_shared_once_and_the_weights_restore_its_mean():
    batches = length_grouped_batches(list(np.random.default_rng(0).integers(3, 30, size=37)), 8, seed=1)
    for size in (2, 3):
        shares = [shard_batches(batches, rank, size) for rank in range(size)]
        for b, batch in enumerate(batches):
            covered = sorted(i for rank in range(size) for i in shares[rank][0][b] if shares[rank][1][b] > 0)
            assert covered == sorted(batch)  # every example of the global batch once, on one rank
            # the ranks' weighted losses, averaged (DDP averages), are the batch mean
            assert sum(shares[rank][1][b] for rank in range(size)) / size == pytest.approx(1.0)
    # a last batch smaller than the ranks: the rank without a share still steps, on weight 0
    shares, weights = shard_batches([[4, 5, 6, 7], [9]], rank=1, size=2)
    assert shares == [[5, 7], [9]] and weights == [1.0, 0.0]


def test_one_process_starts_nothing_and_draws_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the single-process path started distributed machinery")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(distributed.os, "execv", refuse)
    before = torch.get_rng_state()
    with distributed.session(Distributed(), "teacher") as world:
        assert world is distributed.SINGLE and world.main and not world.distributed
    assert torch.equal(before, torch.get_rng_state())


def test_nccl_without_cuda_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^params.yaml: distributed.backend: nccl needs CUDA GPUs and this "
                                          "machine has none: use gloo"):
        distributed.backend_for(Distributed(processes=2, backend="nccl"))
    assert distributed.backend_for(Distributed(processes=2)) == "gloo"


def test_the_stage_says_what_is_wrong_before_starting_any_process(tmp_path, monkeypatch):
    """`dvc repro` with nccl on a CPU machine: `teacher: error: ...`, one line, no torchrun, no traceback."""
    params = yaml.safe_load((HERE.parent / "params.yaml").read_text())
    params["teacher"]["distributed"] = {"processes": 2, "backend": "nccl"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.os, "execv", lambda *a: pytest.fail("torchrun started"))
    with pytest.raises(SystemExit) as stopped:
        run_stage("teacher", load_stage("teacher").main)
    assert str(stopped.value).startswith("teacher: error: params.yaml: distributed.backend: nccl needs CUDA")
    assert "\n" not in str(stopped.value)


def test_processes_below_one_are_refused():
    with pytest.raises(ConfigError, match=r"distributed.processes: Input should be greater than or equal to 1"):
        Distributed(processes=0)


def test_torchrun_command_standalone_or_at_the_rendezvous(monkeypatch):
    monkeypatch.delenv("DISTILOPS_RENDEZVOUS", raising=False)
    one_node = distributed.launch_command(Distributed(processes=2), "teacher", "stages/teacher.py")
    assert one_node[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=2", "--standalone",
                            "stages/teacher.py"]
    with pytest.raises(SettingError, match="distributed.nodes is 3: set DISTILOPS_RENDEZVOUS"):
        distributed.launch_command(Distributed(processes=2, nodes=3), "teacher", "stages/teacher.py")
    monkeypatch.setenv("DISTILOPS_RENDEZVOUS", "distilops-train-0.distilops-train:29400")
    nodes = distributed.launch_command(Distributed(processes=4, nodes=3), "teacher", "stages/teacher.py")
    assert nodes[3:-1] == ["--nproc-per-node=4", "--max-restarts=2", "--nnodes=3", "--rdzv-backend=c10d",
                           "--rdzv-endpoint=distilops-train-0.distilops-train:29400", "--rdzv-id=distilops-teacher"]


# --- real process groups (torchrun, gloo) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    """Without dropout a step is a function of the batch alone, so 1 and 2 processes can be compared step by step
    (with dropout each rank draws its own masks: the same in distribution, not in value)."""
    return make_tiny_model(tmp_path_factory.mktemp("ddp") / "model", dropout=0.0)


def train_run(model: Path, out: Path, processes: int, *kill: int) -> dict:
    out.mkdir(parents=True)
    done = subprocess.run([sys.executable, str(HERE / "ddp_train.py"), str(model), str(out), str(processes),
                           *map(str, kill)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def two_processes(no_dropout_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    return out, train_run(no_dropout_model, out, 2)


@pytest.mark.slow
def test_two_processes_train_as_one_at_the_same_global_batch(no_dropout_model, two_processes, tmp_path):
    one = train_run(no_dropout_model, tmp_path / "one", 1)
    out, two = two_processes
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(two["losses"]) == len(one["losses"]) == one["steps"] == 20  # 151 examples, batch 16, 2 epochs
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=1e-6)
    assert two["history"] == one["history"] and two["best_step"] == one["best_step"]
    for name, total in one["weights"].items():
        assert two["weights"][name] == pytest.approx(total, abs=1e-4), name
    # rank 0 alone checkpoints: one last and one best file, not one per rank
    assert sorted(p.name.split(".", 1)[1] for p in (out / "checkpoints").iterdir()) == ["best.pt", "pt"]


@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_same_result(no_dropout_model, two_processes, tmp_path):
    """Rank 1 SIGKILLed at its 7th step (the checkpoint is at step 4): torchrun restarts both processes, which
    resume from the checkpoint and end where the uninterrupted run ended."""
    _, whole = two_processes
    resumed = train_run(no_dropout_model, tmp_path / "killed", 2, 1, 7)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 20
    np.testing.assert_allclose(resumed["losses"], whole["losses"][4:], rtol=0, atol=1e-6)
    assert resumed["history"] == whole["history"]
    for name, total in whole["weights"].items():
        assert resumed["weights"][name] == pytest.approx(total, abs=1e-5), name


@pytest.mark.slow
def test_the_dvc_stages_train_and_score_on_two_processes(repo_copy):
    """`dvc repro` of teacher and teacher_outputs with 2 processes each: the stages relaunch through torchrun;
    one MLflow run, one model folder, no checkpoint left; the cached outputs are the single process's."""
    make_reviews(n_movies=40).to_csv(repo_copy.path / "reviews.csv", index=False)
    make_tiny_model(repo_copy.path / "tiny-teacher", layers=2)
    repo_copy.set_params({**TINY, "teacher.model": "tiny-teacher", "teacher.epochs": 2,
                          "teacher.distributed": {"processes": 2, "backend": "gloo"},
                          "teacher_outputs.distributed": {"processes": 2}})
    done = repo_copy.dvc("repro", "teacher_outputs")
    assert "through torchrun (gloo)" in done.stdout + done.stderr

    metrics = json.loads((repo_copy.path / "metrics/teacher.json").read_text())
    assert metrics["val_accuracy"] > 0.5 and metrics["layers"] == 2
    client = mlflow.MlflowClient(tracking_uri=repo_copy.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("distilops").experiment_id])
    teacher_runs = [r for r in runs if r.data.tags.get("stage") == "teacher"]
    assert len(teacher_runs) == 1 and teacher_runs[0].data.params["distributed.processes"] == "2"
    steps = [m.step for m in client.get_metric_history(teacher_runs[0].info.run_id, "val_accuracy")]
    assert len(steps) == len(set(steps)) == 3  # one point per epoch and the summary (step 0), each logged once
    assert sorted(p.name for p in (repo_copy.path / "models").iterdir() if p.is_dir()) == ["teacher"]
    assert not any((repo_copy.path / "checkpoints").rglob("*.pt"))

    # the gathered teacher outputs are what one process computes, row for row
    from distilops.pipeline.batching import tokenize
    from distilops.pipeline.modeling import load_classifier, load_tokenizer
    from distilops.pipeline.teacher_outputs import compute

    tokenizer = load_tokenizer(str(repo_copy.path / "models/teacher"))
    model = load_classifier(str(repo_copy.path / "models/teacher"))
    import pandas as pd

    examples = {}
    for split in ("train", "validation"):
        frame = pd.read_parquet(repo_copy.path / f"data/prepared/{split}.parquet")
        examples[split] = tokenize(tokenizer, frame["text"], frame["label"], TINY["max_length"])
    compute(model, examples, tokenizer.pad_token_id, repo_copy.path / "one", batch_size=16, hidden_states=False,
            meta={})
    for split in ("train", "validation"):
        gathered = np.load(repo_copy.path / f"data/teacher_outputs/{split}_logits.npy")
        single = np.load(repo_copy.path / f"one/{split}_logits.npy")
        assert gathered.shape == single.shape == (len(examples[split]), 2)
        np.testing.assert_allclose(gathered, single, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_final_student_trains_on_two_processes(repo_copy):
    """`dvc repro distill` with distill.distributed at 2: rank 0 runs the study alone and hands the chosen
    parameters over; both ranks train the final student; one MLflow run of the stage, one student folder."""
    from test_pipeline_train import tiny_pipeline

    tiny_pipeline(repo_copy)
    repo_copy.set_params({"distill.distributed": {"processes": 2}})
    done = repo_copy.dvc("repro", "distill")
    assert "distill: 2 process(es) x 1 node(s) through torchrun (gloo)" in done.stdout + done.stderr
    metrics = json.loads((repo_copy.path / "metrics/distill.json").read_text())
    assert metrics["val_accuracy"] > 0.7 and metrics["trials"] == 2
    assert (repo_copy.path / "models/student/model.safetensors").exists()
    client = mlflow.MlflowClient(tracking_uri=repo_copy.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("distilops").experiment_id])
    assert len([r for r in runs if r.info.run_name == "distill"]) == 1
    assert not any((repo_copy.path / "checkpoints").rglob("*.pt"))

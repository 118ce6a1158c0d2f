"""Run lineage: the commit tag says whether the code and params that made a model were committed; the
MLflow experiment opens on its training runs; the splits appear as MLflow dataset inputs."""

import mlflow
import pandas as pd
from conftest import RepoCopy, run

from distilops.tracking import EXPERIMENT_KIND_TAG, configure, git_commit, log_dataset


def test_commit_tag_is_dirty_only_when_the_pipeline_code_or_params_changed(tmp_path, monkeypatch):
    repo = RepoCopy(tmp_path / "repo")
    # What `dvc repro` rewrites, committed as in this repository: plots, metrics, dvc.lock.
    for output in ("plots/distill/optimization_history.png", "metrics/distill.json", "dvc.lock", "README.md"):
        (repo.path / output).parent.mkdir(parents=True, exist_ok=True)
        (repo.path / output).write_text("before\n")
    run(["git", "add", "-A"], repo.path)
    run(["git", "commit", "-qm", "outputs"], repo.path, repo.env)
    head = run(["git", "rev-parse", "HEAD"], repo.path).stdout.strip()
    monkeypatch.chdir(repo.path)
    monkeypatch.delenv("DISTILOPS_GIT_COMMIT", raising=False)
    assert git_commit() == head

    for output in ("plots/distill/optimization_history.png", "metrics/distill.json", "dvc.lock", "README.md"):
        (repo.path / output).write_text("rewritten by a run\n")
    (repo.path / "tests").mkdir()
    (repo.path / "tests/new_test.py").write_text("untracked\n")
    assert git_commit() == head  # a fresh clone after `make run`: still the clean commit

    for source in ("src/distilops/pipeline/losses.py", "stages/distill.py", "params.yaml", "dvc.yaml"):
        original = (repo.path / source).read_text()
        (repo.path / source).write_text(original + "\n# edited\n")
        assert git_commit() == head + "-dirty", source
        (repo.path / source).write_text(original)
    assert git_commit() == head


def test_the_experiment_opens_on_training_runs_and_lists_its_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DISTILOPS_EXPERIMENT", "tracking-test")
    experiment_id = configure()
    client = mlflow.MlflowClient()
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    # An experiment made before the tag existed gets it on the next run.
    client.delete_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG)
    assert configure() == experiment_id
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    frame = pd.DataFrame({"text": ["good", "bad", "fine"], "label": [1, 0, 1]})
    with mlflow.start_run() as active:
        log_dataset(frame, "train", tmp_path / "train.parquet", "training")
        log_dataset(frame.head(2), "validation", tmp_path / "validation.parquet", "validation")
    inputs = client.get_run(active.info.run_id).inputs.dataset_inputs
    logged = {i.dataset.name: (i.tags[0].value, i.dataset.source) for i in inputs}
    assert logged["train"][0] == "training" and "train.parquet" in logged["train"][1]
    assert logged["validation"][0] == "validation"
    assert len({i.dataset.digest for i in inputs}) == 2  # the digest follows the content

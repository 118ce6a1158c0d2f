"""MLflow set-up and run lineage shared by every stage.

Default store: `sqlite:///<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts` (both
git-ignored). Set MLFLOW_TRACKING_URI to use a real MLflow server instead.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import mlflow.data
import pandas as pd
import yaml

from distilops import paths, settings

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def tracking_uri() -> str:
    return settings.TRACKING_URI.read() or f"sqlite:///{Path.cwd() / paths.MLFLOW_DB}"


def redact_uri(uri: str) -> str:
    """A URI fit to print or store: any user:password@ removed."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def experiment_name() -> str:
    return settings.EXPERIMENT.read()


def configure(experiment: str | None = None) -> str:
    """Point MLflow (tracking and registry) at the configured store; return the experiment id."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = experiment or experiment_name()
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        mlflow.set_experiment(name)
        if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older distilops
            mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, "custom_model_development")
        return found.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the local store, not in the cwd of whoever runs
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    # MLflow 3 opens an experiment without a kind on its GenAI overview; ours holds training runs.
    experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location,
                                             tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    mlflow.set_experiment(name)
    return experiment_id


def pipeline_sources(root: Path = Path(".")) -> list[str]:
    """What produces the models: dvc.yaml, params.yaml and every dependency its stages declare that no
    stage writes (the stage scripts and the distilops modules they import). Data deps are git-ignored."""
    try:
        stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return ["."]  # no readable pipeline here: any tracked change counts
    outputs = {next(iter(out)) if isinstance(out, dict) else out for stage in stages.values()
               for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])}
    deps = {dep for stage in stages.values() for dep in stage.get("deps", [])
            if not any(dep == out or dep.startswith(out.rstrip("/") + "/") for out in outputs)}
    return sorted({"dvc.yaml", "params.yaml", *deps})


def git_commit() -> str:
    """Current commit, suffixed '-dirty' when the code or configuration the pipeline runs (its stages'
    dependencies and params) differs from it; 'unknown' outside git. What `dvc repro` itself rewrites
    (dvc.lock, metrics/, plots/) and files no stage reads (README, tests) leave it clean.

    DISTILOPS_GIT_COMMIT wins: a container image built from a commit has no .git to ask.
    """
    if settings.GIT_COMMIT.read():
        return settings.GIT_COMMIT.read()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *pipeline_sources()],
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def data_hash(report: Path = paths.DATA_REPORT) -> str:
    """Content hash of the prepared splits, written by the prepare stage."""
    try:
        return json.loads(Path(report).read_text())["data_hash"]
    except (OSError, KeyError, json.JSONDecodeError):
        return "unknown"


def lineage(**extra: Any) -> dict[str, str]:
    tags = {"git_commit": git_commit(), "data_hash": data_hash()}
    tags.update({k: str(v) for k, v in extra.items()})
    return tags


@contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None, **tags: Any) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one pipeline stage, tagged with its lineage and logged params."""
    configure()
    with mlflow.start_run(run_name=stage, tags={"stage": stage, **lineage(**tags)}) as run:
        if params:
            log_params(params)
        yield run


def log_params(params: dict[str, Any]) -> None:
    # MLflow caps a param value at 6000 chars; ours are short, lists are stringified.
    mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()})


def log_dataset(frame: pd.DataFrame, name: str, source: str | Path, context: str) -> None:
    """Log a split as an MLflow dataset input of the active run (the runs table's Dataset column):
    its name, content digest, row count and schema, with the file it was read from as source."""
    with warnings.catch_warnings():  # MLflow warns of two equivalent local sources and of integer labels
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=str(source), name=name,
                                          targets="label" if "label" in frame else None)
        mlflow.log_input(dataset, context=context)


def log_model_folder(folder: str | Path, name: str, params: dict[str, Any]) -> str:
    """Record a model folder as an MLflow logged model of the active run: its files as the model's artifacts,
    `params` (the folder's distilops.json) as its params. Returns the model id. A registered version is
    logged as a loadable pyfunc instead (release/pyfunc.py); a stage's own model needs no loader code,
    so training depends on no serving or release code."""
    run = mlflow.active_run()
    model = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id if run else None,
                                           model_type="distilops-model-folder",
                                           params={k: str(v)[:6000] for k, v in params.items()})
    try:
        mlflow.MlflowClient().log_model_artifacts(model.model_id, str(folder))
    except Exception:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    return model.model_id

"""The MLflow UI as a user sees it, rendered by headless Chromium against a real `mlflow server`: the
experiment's runs page lists the stage runs with their datasets, and the model page shows the
`production` alias. (MLflow 3.17 opens on its GenAI view unless the link or the sidebar switch says
`machine_learning`: the README's links say it.)"""

import re
import shutil
import subprocess

import mlflow
import pandas as pd
import pytest
from services import mlflow_server

from distilops.tracking import log_dataset, stage_run

pytestmark = pytest.mark.slow
TRAINING_VIEW = "workflowType=machine_learning"


def rendered_text(url: str) -> str:
    """The page's visible text once its JavaScript has run (Chromium's virtual time: no sleeps)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert chromium, "chromium not found: `apt-get install chromium` (`make test` installs it as root)"
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--virtual-time-budget=20000", "--dump-dom", url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", result.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_the_ui_lists_stage_runs_with_datasets_and_the_production_alias(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    frame = pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]})
    for stage in ("teacher", "distill"):
        with stage_run(stage) as run:
            log_dataset(frame, "train", tmp_path / "train.parquet", "training")
            mlflow.log_metric("val_accuracy", 0.9)
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model("tiny-sentiment")
    version = client.create_model_version("tiny-sentiment", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("tiny-sentiment", "production", version.version)
    experiment_id = run.info.experiment_id

    (tmp_path / "artifacts").mkdir()
    server = mlflow_server(store, tmp_path / "artifacts", tmp_path / "server.log")
    try:
        server.wait_ready(timeout=120)
        runs_page = rendered_text(f"{server.url}/#/experiments/{experiment_id}?{TRAINING_VIEW}")
        assert "teacher" in runs_page and "distill" in runs_page, runs_page[:2000]
        assert "train (" in runs_page and "training" in runs_page  # the Dataset column: name (digest) context
        model_page = rendered_text(f"{server.url}/#/models/tiny-sentiment?{TRAINING_VIEW}")
        assert "Version 1" in model_page and "production" in model_page, model_page[:2000]
    finally:
        server.stop()

"""The whole pipeline for real, as a team runs it: `dvc repro` of every stage on a tiny model and
fixture data in a temporary copy of the repository, tracked by a real `mlflow server` (runs and
registry in PostgreSQL, artifacts proxied) through MLFLOW_TRACKING_URI; then the registry it leaves
behind, then promote, package and serve, and a real request answered by the promoted version."""

import json
import sys
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from conftest import ROOT, run
from services import mlflow_server
from serving import Server, free_port
from test_pipeline_train import tiny_pipeline

pytestmark = pytest.mark.slow

FAST_EVALUATION = {"evaluate.speed_texts": 32, "evaluate.latency_samples": 10, "evaluate.repeats": 1,
                   "evaluate.bootstrap_resamples": 200, "model_name": "tiny-sentiment",
                   "max_windows": 4,  # evaluated with, registered with, so served with: /model must say 4
                   "promote.min_accuracy_retention": 0.5}  # ~70 test texts: the retention interval is wide


@pytest.fixture()
def tracking_server(repo_copy, postgres):
    artifacts = repo_copy.path.parent / "mlartifacts"
    artifacts.mkdir()
    server = mlflow_server(postgres.create_database("mlflow_e2e"), artifacts, repo_copy.path.parent / "mlflow.log")
    try:
        server.wait_ready(timeout=120)
        repo_copy.env["MLFLOW_TRACKING_URI"] = server.url
        yield server
    finally:
        server.stop()


def test_full_pipeline_registers_a_serving_version(repo_copy, tracking_server):
    tiny_pipeline(repo_copy)
    repo_copy.set_params(FAST_EVALUATION)
    run(["git", "add", "-A"], repo_copy.path)
    run(["git", "commit", "-qm", "tiny pipeline"], repo_copy.path, repo_copy.env)  # runs tag a clean commit
    head = run(["git", "rev-parse", "HEAD"], repo_copy.path).stdout.strip()
    result = repo_copy.dvc("repro")
    for stage in ("long_texts", "quantize", "evaluate", "register", "summary"):
        assert f"Running stage '{stage}'" in result.stdout

    # `dvc metrics show`: one short row of headline numbers; each stage's detail stays in its own file.
    shown = json.loads(repo_copy.dvc("metrics", "show", "--json").stdout)
    (files,) = [entry["data"] for entry in shown.values()]
    assert list(files) == ["metrics/summary.json"]
    summary = files["metrics/summary.json"]["data"]
    assert summary["serving_variant"] == "onnx_int8_static"  # batch-invariant: register.serving.cpu's default
    assert 0 <= summary["test_accuracy_low"] <= summary["test_accuracy"]
    assert len(summary) < 20

    checks = json.loads((repo_copy.path / "metrics/quantize.json").read_text())
    assert set(checks) == {"torch_int8", "onnx_fp32", "onnx_int8", "onnx_int8_static", "onnx_fp16", "teacher_onnx"}
    assert checks["teacher_onnx"]["accepted"] and checks["teacher_onnx"]["agreement_with_teacher"] >= 0.999
    assert (repo_copy.path / "models/teacher_onnx/model.onnx").stat().st_size > 0  # a DVC out of quantize
    evaluation = json.loads((repo_copy.path / "metrics/evaluate.json").read_text())
    models = evaluation["models"]
    assert set(models) == {"teacher", "student", "student_torch_int8", "student_onnx_fp32", "student_onnx_int8",
                           "student_onnx_int8_static", "student_onnx_fp16"}
    assert models["student"]["vs_teacher"]["parameter_fraction"] < 1
    assert all(m["size_mb"] > 0 and m["latency_p50_ms"] > 0 for m in models.values())
    assert evaluation["hardware"]["threads"] >= 1 and evaluation["hardware"]["cpu"]
    long_set = evaluation["sets"]["long_reviews"]  # the long-text set, scored for every model with intervals
    assert long_set["examples"] > 10 and set(long_set["models"]) == set(models)
    for entry in [*models.values(), *long_set["models"].values()]:
        low, high = entry["accuracy_ci"]
        assert 0 <= low <= entry["accuracy"] <= high <= 1
    assert 0 <= models["student"]["mcnemar_vs_teacher"]["p_value"] <= 1
    for entry in models.values():
        low, high = entry["agreement_with_teacher_ci"]
        assert 0 <= low <= entry["agreement_with_teacher"] <= high <= 1
    # what each ONNX student would serve is described on the test split, for the service's drift gauges
    assert {n for n, m in models.items() if "reference" in m} == {"student_onnx_fp32", "student_onnx_int8",
                                                                 "student_onnx_int8_static", "student_onnx_fp16"}
    reference = models["student_onnx_int8_static"]["reference"]
    assert reference["texts"] == evaluation["test_examples"]
    assert sum(reference["label"]["fractions"]) == pytest.approx(1)
    # the tables beside the figures hold the report's numbers (test_evaluate.py checks what the figures draw)
    plots = repo_copy.path / "plots/evaluate"
    predictions = pd.read_csv(plots / "predictions.csv")
    assert list(predictions.columns) == ["actual", *models] and len(predictions) == evaluation["test_examples"]
    for name, entry in models.items():
        assert (predictions[name] == predictions["actual"]).mean() == pytest.approx(entry["accuracy"])
    tradeoff = pd.read_csv(plots / "tradeoff.csv").set_index("model")
    assert list(tradeoff.index) == list(models)
    assert tradeoff["accuracy"].to_dict() == pytest.approx({n: m["accuracy"] for n, m in models.items()})
    assert tradeoff["latency_p50_ms"].to_dict() == pytest.approx({n: m["latency_p50_ms"] for n, m in models.items()})
    sets = pd.read_csv(plots / "sets.csv")
    assert set(sets["set"]) == {"test", *evaluation["sets"]}
    assert len(sets) == len(models) * (1 + len(evaluation["sets"]))
    long_rows = sets[sets["set"] == "long_reviews"].set_index("model")["accuracy"].to_dict()
    assert long_rows == pytest.approx({n: m["accuracy"] for n, m in long_set["models"].items()})
    for figure in ("confusion_matrices.png", "accuracy_vs_latency.png", "set_accuracies.png"):
        assert (plots / figure).read_bytes()[:4] == b"\x89PNG"

    registered = json.loads((repo_copy.path / "metrics/register.json").read_text())
    assert registered["versions"]["student"]["role"] == "reference"
    shadow = str(registered["shadow_version"])
    assert registered["versions"]["teacher_onnx_fp32"]["role"] == "teacher"
    devices = {device: str(v) for device, v in registered["serving_versions"].items()}
    assert set(devices) == {"cpu", "gpu"} and devices["cpu"] == str(registered["serving_version"])
    # Both URIs: an earlier test may have set the process-wide registry URI to its own store.
    uri = repo_copy.env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    serving = client.get_model_version("tiny-sentiment", str(registered["serving_version"]))
    assert serving.tags["variant"] == "onnx_int8_static" and serving.tags["role"] == "serving"
    assert serving.tags["device"] == "cpu" and serving.tags["format"] == "onnx"
    gpu = client.get_model_version("tiny-sentiment", devices["gpu"])
    assert (gpu.tags["variant"], gpu.tags["device"]) == ("onnx_fp16", "gpu")  # never int8 on a GPU
    for version in (serving, gpu):  # each names its release's version for every device
        assert {version.tags["release.cpu"], version.tags["release.gpu"]} == set(devices.values())
        assert version.tags["release.shadow"] == shadow  # and its teacher, the shadow model
    teacher = client.get_model_version("tiny-sentiment", shadow)
    assert (teacher.tags["role"], teacher.tags["variant"], teacher.tags["release.shadow"]) == (
        "teacher", "teacher_onnx_fp32", shadow)
    assert float(serving.tags["eval.agreement_with_teacher_low"]) == pytest.approx(
        models["student_onnx_int8_static"]["agreement_with_teacher_ci"][0])
    assert serving.tags["teacher"] == "tiny-teacher" and serving.tags["optuna_study"].startswith("distill-")
    assert float(serving.tags["eval.accuracy"]) == pytest.approx(models["student_onnx_int8_static"]["accuracy"])
    assert float(serving.tags["eval.accuracy_retention_low"]) == pytest.approx(
        models["student_onnx_int8_static"]["retention_ci"][0])
    assert float(serving.tags["eval.long_reviews.accuracy"]) == pytest.approx(
        long_set["models"]["student_onnx_int8_static"]["accuracy"])
    assert len(serving.tags["test_correct"]) > 0 and serving.tags["test_examples"] == str(evaluation["test_examples"])
    assert len(serving.tags["data_hash"]) == 64 and serving.tags["git_commit"] == head  # not -dirty
    # stored through the server (proxied artifacts), not on this disk
    assert client.get_model_version_download_uri("tiny-sentiment", serving.version).startswith("mlflow-artifacts:")
    assert summary["serving_version"] == registered["serving_version"]
    assert summary["test_accuracy"] == pytest.approx(models["student_onnx_int8_static"]["accuracy"], abs=1e-4)

    # Every stage ran as an MLflow run tagged with its lineage.
    runs = client.search_runs([client.get_experiment_by_name("distilops").experiment_id],
                              "tags.mlflow.parentRunId IS NULL")
    assert {r.data.tags["stage"] for r in runs} >= {"teacher", "distill", "evaluate", "register"}
    assert all(r.data.tags["data_hash"] == serving.tags["data_hash"] for r in runs)
    assert all(r.data.tags["git_commit"] == head for r in runs)
    datasets = {r.data.tags["stage"]: {(i.dataset.name, i.tags[0].value) for i in r.inputs.dataset_inputs}
                for r in runs}  # the runs table's Dataset column
    assert datasets["teacher"] == datasets["distill"] == {("train", "training"), ("validation", "validation")}
    assert datasets["evaluate"] == {("test", "evaluation"), ("long_reviews", "evaluation")}
    experiment = client.get_experiment_by_name("distilops")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on these runs

    again = repo_copy.dvc("repro")
    assert "Running stage" not in again.stdout

    # A choice rule that picks the same point (every point is faster than 0.01x the teacher): distill reruns and
    # reuses the student it trained (no training); the student's folder and metrics/distill_choice.json come out
    # byte for byte the same, so no stage after distill reruns and the registry gains no version.
    chosen = json.loads((repo_copy.path / "metrics/distill.json").read_text())["choice"]
    count = len(client.search_model_versions("name = 'tiny-sentiment'"))
    rule = repo_copy.dvc("exp", "run", "-S", "distill.choose.min_speedup=0.01")
    assert "Running stage 'distill'" in rule.stdout
    assert "reusing the one trained with these parameters" in rule.stdout + rule.stderr
    for stage in ("quantize", "evaluate", "register", "summary"):
        assert f"Running stage '{stage}'" not in rule.stdout, stage
    redone = json.loads((repo_copy.path / "metrics/distill.json").read_text())
    assert redone["final_reused"] and redone["choice"]["rule"]["min_speedup"] == 0.01
    assert redone["choice"]["trial"] == chosen["trial"]
    assert len(client.search_model_versions("name = 'tiny-sentiment'")) == count
    # Registering the same folders again adds no version either: each names the version it matched.
    forced = repo_copy.dvc("repro", "--force", "--single-item", "register")  # register alone, not what it needs
    assert (forced.stdout + forced.stderr).count("already holds this folder") == len(registered["versions"])
    assert json.loads((repo_copy.path / "metrics/register.json").read_text()) == registered
    assert len(client.search_model_versions("name = 'tiny-sentiment'")) == count

    # The README's commands as typed after `make run`, from a shell that never entered the venv.
    readme = run(["bash", str(ROOT / "tests/readme_commands.sh"), str(ROOT / "README.md"),
                  str(Path(sys.executable).parent.parent), str(repo_copy.path)], repo_copy.path, repo_copy.env)
    assert "ok (ran): dvc metrics show" in readme.stdout and "ok (ran): distilops versions" in readme.stdout

    # Promote (gated; the tiny model's p95 is far under the bound), then package and serve it.
    distilops = str(Path(sys.executable).parent / "distilops")
    promoted = run([distilops, "promote"], repo_copy.path, repo_copy.env)
    assert f"to v{registered['serving_version']}" in promoted.stdout
    history = run([distilops, "history"], repo_copy.path, repo_copy.env)
    assert f"(none) -> v{registered['serving_version']}" in history.stdout

    port = free_port()
    env = {**repo_copy.env, "BENTOML_HOME": str(repo_copy.path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    server = Server([distilops, "serve", "--port", str(port)], env, port, repo_copy.path / "serve.log",
                    cwd=repo_copy.path)
    try:
        server.wait_ready()
        long_text = " ".join(["a wonderful, moving film"] * 40)  # 200 tokens: 4 windows of 32 are not enough
        reply = httpx.post(server.url + "/classify", json={"texts": ["a wonderful, moving film", "dull and bland",
                                                                     long_text]})
        assert reply.status_code == 200 and len(reply.json()) == 3
        assert [(r["windows"], r["truncated"]) for r in reply.json()] == [(1, False), (1, False), (4, True)]
        assert reply.headers["x-model-version"] == str(registered["serving_version"])
        info = httpx.get(server.url + "/model").json()
        assert info["variant"] == "onnx_int8_static" and info["format"] == "onnx"
        assert info["lineage"]["data_hash"] == serving.tags["data_hash"]
        assert info["limits"]["max_windows"] == 4 and info["max_length"] == 32
    finally:
        server.stop()

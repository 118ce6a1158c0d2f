"""The BentoML service for real: a tiny model registered in a SQLite MLflow registry, promoted, packaged
into a temporary BentoML store and served by `bentoml serve` on 127.0.0.1."""

import asyncio
import contextlib
import os
import time
from pathlib import Path

import httpx
import pytest
from serving import PROBE_PATHS, batch_histogram, bentoml_serve, free_port
from tiny import make_tiny_model

from distilops.config import PromoteConfig
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.quantize import build
from distilops.release.package import package
from distilops.release.registry import promote, register_version
from distilops.serving.inference import TextClassifier
from distilops.tracking import stage_run

pytestmark = pytest.mark.slow
NAME = "tiny-sentiment"
MAX_TEXTS, MAX_CHARS, MAX_LENGTH, MAX_WINDOWS = 8, 300, 16, 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "BENTOML_HOME": str(root / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true", "DISTILOPS_MAX_TEXTS": str(MAX_TEXTS),
           "DISTILOPS_MAX_TEXT_CHARS": str(MAX_CHARS), "DISTILOPS_MAX_LATENCY_MS": "2000",
           "DISTILOPS_MAX_WINDOWS": str(MAX_WINDOWS)}
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "BENTOML_HOME")}
    os.environ.update({k: env[k] for k in saved})
    try:
        raw = make_tiny_model(root / "raw", layers=2)
        student = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), root / "model",
                                    max_length=MAX_LENGTH, teacher="tiny-teacher")
        folder = build("onnx_int8", student, root / "quantized")  # what CPU pods serve
        with stage_run("register"):
            for _ in range(2):  # v1, v2: v2 is promoted, so the server must say 2
                mv = register_version(folder, model_name=NAME, tags={"variant": "onnx_int8", "role": "serving",
                                                                     "device": "cpu"},
                                      metrics={"accuracy": 0.9, "teacher_accuracy": 0.91, "latency_p95_ms": 2.0})
        promote(NAME, PromoteConfig(model_name=NAME), version=mv.version)
        packaged = package(NAME)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    server = bentoml_serve(free_port(), {**env, "DISTILOPS_BENTO_MODEL": packaged.tag}, root / "server.log")
    try:
        server.wait_ready()
        yield server, folder, packaged
    finally:
        server.stop()


@contextlib.contextmanager
def another_server(served, name: str, **settings: str):
    """The same packaged model served again with other settings (one `bentoml serve` of its own)."""
    server, _, packaged = served
    env = {**server.env, "DISTILOPS_BENTO_MODEL": packaged.tag, **settings}
    other = bentoml_serve(free_port(), env, server.log.parent / f"{name}.log")
    try:
        yield other
    finally:
        other.stop()


def post(server, body=None, **kwargs):
    return httpx.post(server.url + "/classify", json=body, timeout=30, **kwargs)


def test_answers_match_the_model_and_name_the_version(served):
    server, folder, packaged = served
    texts = ["a wonderful, moving film", "tedious and dull", "the plot is messy but the acting is superb"]
    response = post(server, {"texts": texts})
    assert response.status_code == 200
    assert response.headers["x-model-name"] == NAME and response.headers["x-model-version"] == "2"
    expected = TextClassifier(folder).classify(texts)
    got = response.json()
    assert [r["label"] for r in got] == [e.label for e in expected]
    assert [r["score"] for r in got] == pytest.approx([e.score for e in expected], abs=1e-5)
    assert not any(r["truncated"] for r in got)

    info = httpx.get(server.url + "/model").json()
    assert (info["registry_name"], info["registry_version"], info["bento_model"]) == (NAME, "2", packaged.tag)
    assert info["format"] == "onnx" and info["providers"] == ["CPUExecutionProvider"] and info["device"] == "cpu"
    assert info["lineage"]["teacher"] == "tiny-teacher" and info["metrics"]["accuracy"] == 0.9
    assert info["limits"]["max_texts"] == MAX_TEXTS
    assert info["spin_wait"] is False  # ONNX Runtime's idle threads sleep: CPU use reads true load


def test_health_endpoints_and_prometheus_metrics(served):
    server, _, _ = served
    for path in PROBE_PATHS:
        assert httpx.get(server.url + path).status_code == 200
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request_total" in metrics.text
    # the gauge the GPU overlay's autoscaler scales on (through prometheus-adapter; k8s/overlays/gpu)
    assert 'bentoml_service_request_in_progress{endpoint="/classify"' in metrics.text


def test_a_long_text_is_read_in_windows_up_to_the_cap(served):
    server, folder, _ = served
    # Windows of 16 tokens: 14 word tokens, 3 shared with the next window (a quarter), so starts 0, 11, 22, 33.
    two_windows, four_windows = " ".join(["great film"] * 10), " ".join(["great film"] * 20)  # 22 and 42 tokens
    got = post(server, {"texts": [four_windows, two_windows, "dull"]}).json()
    assert [(r["windows"], r["truncated"]) for r in got] == [(3, True), (2, False), (1, False)]  # the cap is 3
    expected = TextClassifier(folder, max_windows=MAX_WINDOWS).classify([four_windows, two_windows, "dull"])
    assert [r["label"] for r in got] == [p.label for p in expected]
    assert [r["score"] for r in got] == pytest.approx([p.score for p in expected], abs=1e-5)
    assert httpx.get(server.url + "/model").json()["limits"]["max_windows"] == MAX_WINDOWS


def test_concurrent_requests_are_batched(served):
    server, _, _ = served
    calls_before, requests_before = batch_histogram(httpx.get(server.url + "/metrics").text)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            replies = await asyncio.gather(*[client.post(server.url + "/classify", json={"texts": [f"film {i}"]})
                                             for i in range(48)])
        return [r.status_code for r in replies]

    assert asyncio.run(burst()) == [200] * 48
    calls, requests = batch_histogram(httpx.get(server.url + "/metrics").text)
    assert requests - requests_before == 48
    assert calls - calls_before < 48  # several requests shared one model call


@pytest.mark.parametrize("body,status,message", [
    ({"texts": []}, 400, "at least 1 item"),
    ({"texts": [""]}, 400, "empty or only whitespace"),
    ({"texts": ["   "]}, 400, "empty or only whitespace"),
    ({"texts": ["fine", 3]}, 400, "valid string"),
    ({"texts": "not a list"}, 400, "valid array"),
    ({}, 400, "Field required"),
    ({"texts": ["x"] * (MAX_TEXTS + 1)}, 400, f"at most {MAX_TEXTS} items"),
    ({"texts": ["x" * (MAX_CHARS + 1)]}, 400, f"at most {MAX_CHARS} characters"),
])
def test_bad_input_is_a_clear_4xx_and_the_server_stays_up(served, body, status, message):
    server, _, _ = served
    response = post(server, body)
    assert response.status_code == status and message in response.text
    assert post(server, {"texts": ["still serving"]}).status_code == 200


def test_invalid_json_and_wrong_content_type(served):
    server, _, _ = served
    url = server.url + "/classify"
    bad_json = httpx.post(url, content=b'{"texts": ["x"', headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "Invalid JSON" in bad_json.text
    plain = httpx.post(url, content=b'{"texts": ["x"]}', headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and "must be application/json" in plain.text
    assert plain.headers["x-model-version"] == "2"  # metadata on errors too
    form = httpx.post(url, data={"texts": "x"})
    assert form.status_code == 415
    assert httpx.get(server.url + "/livez").status_code == 200


def test_bentoml_build_bakes_exactly_the_packaged_model(served, tmp_path):
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    import yaml

    server, _, packaged = served
    root = Path(__file__).resolve().parents[1]
    bentoml = str(Path(sys.executable).parent / "bentoml")
    env = {**server.env, "DISTILOPS_BENTO_MODEL": packaged.tag}
    build = subprocess.run([bentoml, "build", "-f", str(root / "bentofile.yaml"), "-o", "tag", str(root / "src")],
                           cwd=root, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    bento = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    exported = tmp_path / "classifier.bento"
    subprocess.run([bentoml, "export", bento, str(exported)], env=env, check=True, capture_output=True)
    with tarfile.open(exported) as archive:
        names = archive.getnames()
        info = yaml.safe_load(archive.extractfile("./bento.yaml"))
    name, version = packaged.tag.split(":")
    assert info["services"][0]["models"][0]["tag"] == packaged.tag
    assert f"./models/{name}/{version}/model/model.onnx" in names  # the weights travel in the Bento
    assert "./src/distilops/serving/service.py" in names and "./env/docker/Dockerfile" in names
    assert "./src/distilops/pipeline/training.py" not in names  # only what the service imports


FAULTS = str(Path(__file__).resolve().parent / "faults")  # sitecustomize.py: makes ONNX Runtime's calls raise


def probe_status(server, path: str) -> int:
    return httpx.get(server.url + path, timeout=10).status_code


def wait_for(condition, timeout: float = 60, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if condition():
                return True
        time.sleep(every)
    return False


def test_repeated_inference_failures_flip_readiness_then_liveness(served):
    """A sticky GPU error: after its first calls every model call raises. The pod answers 500s, turns unready
    after 3 failures in a row (so no traffic reaches it), and unalive once it has failed for the configured time,
    so the kubelet restarts it. Fault injected at ONNX Runtime's session (tests/faults/sitecustomize.py)."""
    env = {"PYTHONPATH": os.pathsep.join([FAULTS, os.environ.get("PYTHONPATH", "")]),
           "DISTILOPS_TEST_FAIL_AFTER_CALLS": "2", "DISTILOPS_UNREADY_AFTER_FAILURES": "3",
           "DISTILOPS_DEAD_AFTER_SECONDS": "4"}
    with another_server(served, "sticky-error", **env) as server:
        server.wait_ready()
        assert [post(server, {"texts": ["fine"]}).status_code for _ in range(2)] == [200, 200]
        assert probe_status(server, "/readyz") == 200 and probe_status(server, "/livez") == 200
        assert [post(server, {"texts": ["doomed"]}).status_code for _ in range(3)] == [500, 500, 500]
        assert probe_status(server, "/readyz") == 503  # not ready: the Service stops sending it traffic
        assert probe_status(server, "/livez") == 200  # not dead yet: a transient fault may still clear
        assert wait_for(lambda: probe_status(server, "/livez") == 503, timeout=30), "never stopped being alive"
        assert probe_status(server, "/readyz") == 503
        assert "inference failed (3 in a row; not ready until a call succeeds)" in server.log.read_text()


def test_a_transient_failure_clears_readiness_again(served):
    """Three failed calls, then the device works again: the readiness probe's own call succeeds and the pod is
    ready again, without a restart."""
    env = {"PYTHONPATH": os.pathsep.join([FAULTS, os.environ.get("PYTHONPATH", "")]),
           "DISTILOPS_TEST_FAIL_AFTER_CALLS": "1", "DISTILOPS_TEST_FAIL_CALLS": "3",
           "DISTILOPS_UNREADY_AFTER_FAILURES": "3", "DISTILOPS_DEAD_AFTER_SECONDS": "600"}
    with another_server(served, "transient-error", **env) as server:
        server.wait_ready()
        assert post(server, {"texts": ["fine"]}).status_code == 200
        assert [post(server, {"texts": ["unlucky"]}).status_code for _ in range(3)] == [500, 500, 500]
        assert probe_status(server, "/readyz") == 200  # the probe's own call succeeded: recovered
        assert post(server, {"texts": ["fine again"]}).status_code == 200
        assert probe_status(server, "/livez") == 200


def test_a_bearer_token_guards_classify_and_leaves_probes_and_metrics_open(served):
    with another_server(served, "token", DISTILOPS_API_TOKEN="s3cret-token") as server:
        server.wait_ready()
        body = {"texts": ["a moving film"]}
        assert post(server, body).status_code == 401
        wrong = post(server, body, headers={"Authorization": "Bearer s3cret-tokeN"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert post(server, body, headers={"Authorization": "s3cret-token"}).status_code == 401  # no scheme
        assert post(server, body, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        for path in (*PROBE_PATHS, "/metrics", "/model"):
            assert probe_status(server, path) == 200, path
        assert httpx.get(server.url + "/model").json()["auth"] == "bearer token"


def test_a_503_tells_the_client_when_to_retry(served):
    """An unready pod answers 503 (here: a GPU pod without CUDA); so does BentoML shedding load. Both carry
    Retry-After."""
    with another_server(served, "no-gpu", DISTILOPS_REQUIRE_GPU="1") as server:
        assert wait_for(lambda: probe_status(server, "/livez") == 200, timeout=90)
        readyz = httpx.get(server.url + "/readyz")
        assert readyz.status_code == 503 and readyz.headers["retry-after"] == "1"
    server, _, _ = served
    assert "retry-after" not in httpx.get(server.url + "/readyz").headers

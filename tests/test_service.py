"""The BentoML service for real: a tiny model registered in a SQLite MLflow registry, promoted, packaged
into a temporary BentoML store and served by `bentoml serve` on 127.0.0.1."""

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bentoml
import httpx
import pytest
from serving import PROBE_PATHS, SRC, batch_histogram, bentoml_serve, free_port, sample, scrape
from tiny import distinct, make_tiny_model

from distilops.config import PromoteConfig
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.quantize import build
from distilops.release.package import package
from distilops.release.registry import promote, register_version
from distilops.serving import fidelity
from distilops.serving.folder import MODEL_SUBDIR, SHADOW_SUBDIR, write_meta
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
                mv = register_version(distinct(folder), model_name=NAME,
                                      tags={"variant": "onnx_int8", "role": "serving", "device": "cpu"},
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
    model = TextClassifier(folder)
    expected = [model.classify([text])[0] for text in texts]  # one text per call, as the service runs them
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


MIXED_LENGTHS = ["a long, rambling review that goes on about the plot " * 3, "bad", "a wonderful, moving film",
                 "dull", "superb acting but a messy plot", "fine", "the worst film of the year, tedious and dull", "ok"]


def assert_each_answer_on_its_text(server, folder: Path, score_tolerance: float) -> None:
    """MIXED_LENGTHS in one request: each answer is what the model gives its text alone."""
    response = post(server, {"texts": MIXED_LENGTHS})
    assert response.status_code == 200
    model = TextClassifier(folder, max_windows=MAX_WINDOWS)
    expected = [model.classify([text])[0] for text in MIXED_LENGTHS]
    got = response.json()
    assert [r["label"] for r in got] == [e.label for e in expected]
    assert [r["score"] for r in got] == pytest.approx([e.score for e in expected], abs=score_tolerance)
    assert [r["windows"] for r in got] == [e.windows for e in expected] and got[0]["windows"] > 1


def test_each_answer_lands_on_its_own_text_one_text_per_call(served):
    """Continuous dispatch (the default): 8 texts of mixed lengths, the longest first, each its own model call
    (DISTILOPS_TEXTS_PER_CALL=1), each answer on its own text."""
    server, folder, _ = served
    assert_each_answer_on_its_text(server, folder, score_tolerance=1e-5)
    limits = httpx.get(server.url + "/model").json()["limits"]
    assert (limits["dispatch"], limits["texts_per_call"]) == ("continuous", 1)


def concurrent_calls(server, requests: int = 48) -> tuple[int, float]:
    """(model calls, texts) the service made for `requests` one-text requests sent at once, all answered 200."""
    calls_before, texts_before = batch_histogram(httpx.get(server.url + "/metrics").text)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            replies = await asyncio.gather(*[client.post(server.url + "/classify", json={"texts": [f"film {i}"]})
                                             for i in range(requests)])
        return [r.status_code for r in replies]

    assert asyncio.run(burst()) == [200] * requests
    calls, texts = batch_histogram(httpx.get(server.url + "/metrics").text)
    return calls - calls_before, texts - texts_before


def test_continuous_dispatch_puts_waiting_requests_in_one_call_up_to_its_limit(served):
    with another_server(served, "continuous-4", DISTILOPS_TEXTS_PER_CALL="4") as server:
        server.wait_ready()
        calls, texts = concurrent_calls(server)
        assert texts == 48 and calls < 48  # several requests shared one model call
        metrics, family = scrape(httpx.get(server.url + "/metrics").text), "distilops_texts_per_call"
        within = sample(metrics, family, f"{family}_bucket", le="4.0")
        assert within == sample(metrics, family, f"{family}_count")  # none above 4


def test_adaptive_dispatch_batches_requests_into_calls_of_like_length_keeping_each_answer_on_its_text(served):
    """DISTILOPS_DISPATCH=adaptive (the GPU overlay's): BentoML batches concurrent requests, a batch reaches the model
    sorted by length in calls of at most DISTILOPS_TEXTS_PER_CALL (4), and each answer still lands on its text."""
    _, folder, _ = served
    with another_server(served, "adaptive", DISTILOPS_DISPATCH="adaptive", DISTILOPS_TEXTS_PER_CALL="4") as server:
        server.wait_ready()
        calls, texts = concurrent_calls(server)
        assert texts == 48 and calls < 48  # several requests shared one batch
        # dynamic int8 (this fixture's variant) moves a score by ~1e-4 with what shares its call; windows pin order
        assert_each_answer_on_its_text(server, folder, score_tolerance=1e-3)
        limits = httpx.get(server.url + "/model").json()["limits"]
        assert (limits["dispatch"], limits["texts_per_call"]) == ("adaptive", 4)


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
    model = TextClassifier(folder, max_windows=MAX_WINDOWS)
    expected = [model.classify([text])[0] for text in (four_windows, two_windows, "dull")]
    assert [r["label"] for r in got] == [p.label for p in expected]
    assert [r["score"] for r in got] == pytest.approx([p.score for p in expected], abs=1e-5)
    assert httpx.get(server.url + "/model").json()["limits"]["max_windows"] == MAX_WINDOWS


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


def answers_counted(server) -> dict[str, int]:  # noqa: ANN001
    """distilops_classify_responses_total per status class, as the pod's /metrics exports it."""
    found = re.findall(r'^distilops_classify_responses_total\{code="(\dxx)"[^}]*\} ([\d.e+]+)$',
                       httpx.get(server.url + "/metrics").text, flags=re.M)
    return {code: int(float(value)) for code, value in found}


def test_repeated_inference_failures_flip_readiness_then_liveness(served):
    """A sticky GPU error: after its first calls every model call raises. The pod answers 500s, turns unready
    after 3 failures in a row (so no traffic reaches it), and unalive once it has failed for the configured time,
    so the kubelet restarts it. Fault injected at ONNX Runtime's session (tests/faults/sitecustomize.py)."""
    env = {"PYTHONPATH": os.pathsep.join([FAULTS, os.environ.get("PYTHONPATH", "")]),
           "DISTILOPS_TEST_FAIL_AFTER_CALLS": "2", "DISTILOPS_UNREADY_AFTER_FAILURES": "3",
           "DISTILOPS_DEAD_AFTER_SECONDS": "4"}
    with another_server(served, "sticky-error", **env) as server:
        server.wait_ready()
        assert probe_status(server, "/readyz") == 200 and probe_status(server, "/livez") == 200
        assert answers_counted(server) == {"2xx": 0, "4xx": 0, "5xx": 0}  # every class there from the start:
        assert [post(server, {"texts": ["fine"]}).status_code for _ in range(2)] == [200, 200]  # rate() sees
        assert [post(server, {"texts": ["doomed"]}).status_code for _ in range(3)] == [500, 500, 500]  # each one
        assert answers_counted(server) == {"2xx": 2, "4xx": 0, "5xx": 3}
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
    """An unready pod answers 503 (here: a GPU pod without CUDA); so does BentoML shedding load (here: a 1 ms
    budget no batch can meet, under concurrent requests). Both carry Retry-After; a 200 does not."""
    with another_server(served, "no-gpu", DISTILOPS_REQUIRE_GPU="1") as server:
        assert wait_for(lambda: probe_status(server, "/livez") == 200, timeout=90)
        readyz = httpx.get(server.url + "/readyz")
        assert readyz.status_code == 503 and readyz.headers["retry-after"] == "1"
    server, _, _ = served
    assert "retry-after" not in httpx.get(server.url + "/readyz").headers

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"texts": ["a long and winding review of a film " * 8] * MAX_TEXTS}
            return await asyncio.gather(*[client.post(url + "/classify", json=body) for _ in range(64)])

    with another_server(served, "shedding", DISTILOPS_MAX_LATENCY_MS="1") as server:
        server.wait_ready()
        shed: list[httpx.Response] = []
        for _ in range(10):  # the batcher learns its latency from the first calls, then sheds
            replies = asyncio.run(burst(server.url))
            assert {r.status_code for r in replies} <= {200, 503}
            shed += [r for r in replies if r.status_code == 503]
            if shed:
                break
        assert shed, "no request was shed under a 1 ms budget"
        assert all(r.headers.get("retry-after") == "1" for r in shed)
        assert all("retry-after" not in r.headers for r in replies if r.status_code == 200)


def test_shed_requests_log_one_line_each_are_counted_and_every_request_is_answered(served):
    """Overload: a 20 ms batching budget and 240 requests of 8 texts at once (under the 256 BentoML admits at a time;
    beyond, 429). BentoML sheds what it cannot serve in time (503): each shed request is one log line, no traceback
    (~20 lines each before: thousands a minute under load), the counter says how many, and every request gets an
    answer: no connection dropped unanswered."""
    texts = [" ".join(["a moving film and a dull plot"] * 6)] * MAX_TEXTS  # 3 windows each: costly batches

    async def flood(server) -> list:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=400)) as client:
            return await asyncio.gather(*[client.post(server.url + "/classify", json={"texts": texts})
                                          for _ in range(240)], return_exceptions=True)

    with another_server(served, "overload", DISTILOPS_MAX_LATENCY_MS="20") as server:
        server.wait_ready()
        replies = asyncio.run(flood(server))
        failed = [r for r in replies if isinstance(r, Exception)]
        assert not failed, f"{len(failed)} requests got no response: {failed[:3]}"
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 503} and 200 in statuses
        shed = statuses.count(503)
        assert shed > 0, "nothing was shed: the test did not overload the server"
        assert all(r.headers["retry-after"] == "1" for r in replies if r.status_code == 503)
        log = server.log.read_text()
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
        assert log.count("shed a request (POST /classify): process is overloaded; answered 503") == shed
        counted = sample(scrape(httpx.get(server.url + "/metrics").text), "distilops_shed_requests",
                         "distilops_shed_requests_total")
        assert counted == shed
        assert post(server, {"texts": ["still serving"]}).status_code == 200


def onnxruntime_gpu() -> Path:
    """The GPU image's ONNX Runtime build (release/image.py's GPU_RUNTIME, without the CUDA and cuDNN extras: there is
    no GPU here) at the CPU build's version, installed once into the cache as a folder to put first on PYTHONPATH."""
    import onnxruntime

    from distilops.paths import cache_dir

    target = cache_dir() / "test-runtimes" / f"onnxruntime-gpu-{onnxruntime.__version__}"
    if not (target / "onnxruntime" / "capi").is_dir():
        uv = Path(sys.executable).parent / "uv"
        installer = [str(uv), "pip", "install", "--python", sys.executable] if uv.exists() else [
            sys.executable, "-m", "pip", "install", "--quiet"]
        subprocess.run([*installer, "--target", str(target), "--no-deps",
                        f"onnxruntime-gpu=={onnxruntime.__version__}"], check=True, capture_output=True)
    return target


def test_the_gpu_runtime_without_cuda_never_becomes_ready_and_says_why(served, tmp_path):
    """What a GPU pod runs (onnxruntime-gpu, the GPU variant's fp16 folder, DISTILOPS_REQUIRE_GPU=1) on a node where
    CUDA cannot load: ONNX Runtime lists its CUDA provider, fails to load it and falls back to the CPU; the service
    then stays alive but never ready (no traffic reaches a GPU pod computing on its CPU) and its log says why."""
    from distilops.pipeline.quantize import convert_onnx_fp16
    from distilops.release.package import import_model_folder

    server, folder, _ = served
    fp16 = convert_onnx_fp16(folder.parent / "onnx_fp32", tmp_path / "onnx_fp16")  # the GPU variant
    tag = import_model_folder(fp16, f"{NAME}:gpu-variant", labels={"registry_name": NAME, "registry_version": "3",
                                                                   "variant": "onnx_fp16"}, metadata={})
    runtime = onnxruntime_gpu()
    pythonpath = os.pathsep.join([str(runtime), os.environ.get("PYTHONPATH", "")])
    which = "import onnxruntime as o; print(o.__file__, o.get_available_providers())"
    probe = subprocess.run([sys.executable, "-c", which], env={**server.env, "PYTHONPATH": pythonpath},
                           capture_output=True, text=True, check=True)
    assert str(runtime) in probe.stdout and "CUDAExecutionProvider" in probe.stdout  # the GPU build, not the CPU one
    with another_server(served, "gpu-runtime", PYTHONPATH=pythonpath, DISTILOPS_REQUIRE_GPU="1",
                        DISTILOPS_BENTO_MODEL=tag) as gpu_pod:
        assert wait_for(lambda: probe_status(gpu_pod, "/livez") == 200, timeout=120)
        info = httpx.get(gpu_pod.url + "/model").json()
        assert (info["variant"], info["require_gpu"]) == ("onnx_fp16", True)
        assert info["providers"] == ["CPUExecutionProvider"]
        assert [probe_status(gpu_pod, "/readyz") for _ in range(3)] == [503] * 3
        log = gpu_pod.log.read_text()
        assert "Failed to create CUDAExecutionProvider" in log  # ONNX Runtime's own reason: no libcuda here
        assert log.count("DISTILOPS_REQUIRE_GPU=1 but ONNX Runtime runs this model on ['CPUExecutionProvider']") == 1


# Live fidelity: the shadow model, the metrics of every answered text, drift against the evaluated reference.
OPENINGS = ["a great", "the dull", "a moving", "this bland"]
SHADOW_TEXTS = [f"{OPENINGS[i % 4]} film m{i}" + " and the plot" * (i % 3) for i in range(36)]  # 4, 7 or 10 words


def bento_model(served, tmp_path: Path, version: str, *, shadow: Path | None = None,
                reference: dict | None = None) -> str:
    """The served ONNX folder as a Bento model of its own (registry version 7 of release 7, teacher version 5), with a
    shadow folder and a reference when given: the layout `distilops package` gives a release carrying its teacher."""
    server, folder, _ = served
    model = shutil.copytree(folder, tmp_path / f"{version}-model")
    if reference is not None:
        write_meta(model, reference=reference)
    tag = f"{NAME}:{version}"
    with bentoml.models.create(tag, labels={"registry_name": NAME, "registry_version": "7", "variant": "onnx_int8"},
                               metadata={"release.shadow": "5"}) as created:
        shutil.copytree(model, Path(created.path) / MODEL_SUBDIR)
        if shadow is not None:
            shutil.copytree(shadow, Path(created.path) / SHADOW_SUBDIR)
    # the store the servers read (the fixture's BENTOML_HOME; BentoML fixes its home at first use in a process)
    assert Path(bentoml.models.get(tag).path).is_relative_to(server.env["BENTOML_HOME"])
    return tag


def teacher_like(folder: Path, destination: Path, *, labels: list[str] | None = None,
                 broken_word: str | None = None) -> Path:
    """A shadow model folder: the served weights, recorded as the teacher. `labels` renames the model's outputs
    (["fresh", "rotten"]: it gives the other label for every text, so never agrees); `broken_word` gets a token id
    beyond the model's embeddings, so ONNX Runtime fails any batch holding it."""
    shadow = shutil.copytree(folder, destination)
    write_meta(shadow, role="teacher", variant="teacher_onnx_fp32", source_model="tiny-teacher")
    if labels is not None:
        config = json.loads((shadow / "config.json").read_text())
        config["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config["label2id"] = {name: i for i, name in enumerate(labels)}
        (shadow / "config.json").write_text(json.dumps(config))
    if broken_word is not None:
        tokenizer = json.loads((shadow / "tokenizer.json").read_text())
        tokenizer["model"]["vocab"][broken_word] = 10_000
        (shadow / "tokenizer.json").write_text(json.dumps(tokenizer))
    return shadow


def evaluated(folder: Path, texts: list[str]) -> dict:
    """A reference as evaluate describes a model (serving/fidelity.py), from the model's answers to `texts`."""
    answers = TextClassifier(folder).classify(texts)
    return fidelity.reference(predicted=[a.label for a in answers], confidence=[a.score for a in answers],
                              words=[fidelity.word_count(t) for t in texts], windows=[a.windows for a in answers],
                              labels=TextClassifier(folder).labels, agreement=0.9, agreement_ci=(0.85, 0.94),
                              split="test")


def classify_all(server, texts: list[str]) -> list[dict]:
    """`texts` sent concurrently, MAX_TEXTS per request; the answers in order."""
    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*[client.post(server.url + "/classify", json={"texts": texts[i: i + MAX_TEXTS]})
                                          for i in range(0, len(texts), MAX_TEXTS)])

    replies = asyncio.run(send())
    assert [r.status_code for r in replies] == [200] * len(replies)
    return [answer for reply in replies for answer in reply.json()]


def metrics_when(server, condition, timeout: float = 30) -> dict[str, list]:
    """/metrics scraped until `condition(scraped)` holds (the shadow thread catching up); fails on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        scraped = scrape(httpx.get(server.url + "/metrics", timeout=10).text)
        if condition(scraped):
            return scraped
        assert time.monotonic() < deadline, f"metrics never got there: {scraped.get('distilops_shadow_compared')}"
        time.sleep(0.2)


def shadow_counts(scraped: dict[str, list]) -> tuple[float | None, ...]:
    return tuple(sample(scraped, f"distilops_shadow_{what}", f"distilops_shadow_{what}_total", model_version="7")
                 for what in ("compared", "agreed", "dropped"))


def buckets(scraped: dict[str, list], family: str) -> list[str]:
    return [labels["le"] for name, labels, _ in scraped[family] if name == f"{family}_bucket"]


def test_a_shadow_of_the_served_model_agrees_on_every_text_and_every_metric_is_exported(served, tmp_path):
    """Shadow = the served model: every text compared (rate 1), every one agreed. The contract's metrics, with their
    labels and buckets, and the drift and reference gauges of a model folder that carries a reference."""
    _, folder, _ = served
    reference = evaluated(folder, SHADOW_TEXTS[:20])
    tag = bento_model(served, tmp_path, "shadow-same", shadow=teacher_like(folder, tmp_path / "teacher"),
                      reference=reference)
    settings = {"DISTILOPS_BENTO_MODEL": tag, "DISTILOPS_SHADOW_RATE": "1", "DISTILOPS_DRIFT_WINDOW": "20"}
    with another_server(served, "shadow-same", **settings) as server:
        server.wait_ready()
        answers = classify_all(server, SHADOW_TEXTS)
        n = len(SHADOW_TEXTS)
        scraped = metrics_when(server, lambda m: shadow_counts(m)[0] == n)
        assert shadow_counts(scraped) == (n, n, 0)
        assert sample(scraped, "distilops_live_agreement", model_version="7") == 1.0

        kinds = {"distilops_predictions": "counter", "distilops_prediction_confidence": "histogram",
                 "distilops_text_words": "histogram", "distilops_text_windows": "histogram",
                 "distilops_shadow_compared": "counter", "distilops_shadow_agreed": "counter",
                 "distilops_shadow_dropped": "counter", "distilops_live_agreement": "gauge",
                 "distilops_drift_psi": "gauge", "distilops_reference_agreement": "gauge"}
        assert {family: scraped[f"type:{family}"][0] for family in kinds} == kinds
        assert all(labels["model_version"] == "7" for family in kinds for _, labels, _ in scraped[family])
        per_label = {label: sample(scraped, "distilops_predictions", "distilops_predictions_total", label=label)
                     for label in ("rotten", "fresh")}
        assert per_label == {label: sum(a["label"] == label for a in answers) for label in ("rotten", "fresh")}
        for family, edges in (("distilops_prediction_confidence", fidelity.CONFIDENCE_EDGES),
                              ("distilops_text_words", fidelity.WORDS_EDGES),
                              ("distilops_text_windows", fidelity.WINDOWS_EDGES)):
            assert buckets(scraped, family) == [str(float(edge)) for edge in edges] + ["+Inf"], family
            assert sample(scraped, family, f"{family}_count") == n
        words_in_5 = sum(fidelity.word_count(t) <= 5 for t in SHADOW_TEXTS)
        assert sample(scraped, "distilops_text_words", "distilops_text_words_bucket", le="5.0") == words_in_5

        bounds = {labels["bound"]: value for _, labels, value in scraped["distilops_reference_agreement"]}
        assert bounds == {"point": 0.9, "low": 0.85, "high": 0.94}

        # Drift: the window (20 texts) against the reference (the first 20 texts' own description). The last 20
        # texts are sent again, one request after another, so the window holds exactly them, in order.
        last = SHADOW_TEXTS[-20:]
        again = [answer for i in range(0, len(last), MAX_TEXTS)
                 for answer in post(server, {"texts": last[i: i + MAX_TEXTS]}).json()]
        observed = {"label": fidelity.label_fractions([a["label"] for a in again], reference["label"]["labels"]),
                    "confidence": fidelity.fractions([a["score"] for a in again], fidelity.CONFIDENCE_EDGES),
                    "words": fidelity.fractions([fidelity.word_count(t) for t in last], fidelity.WORDS_EDGES),
                    "windows": fidelity.fractions([a["windows"] for a in again], fidelity.WINDOWS_EDGES)}
        expected = {f: fidelity.psi(reference[f]["fractions"], observed[f]) for f in fidelity.FEATURES}
        assert expected["words"] > 0.01  # the window's mix of lengths is not the reference's: a PSI to get right
        drift = metrics_when(server, lambda m: True)["distilops_drift_psi"]
        psi = {labels["feature"]: value for _, labels, value in drift}
        assert psi == pytest.approx(expected, abs=1e-9)

        info = httpx.get(server.url + "/model").json()
        assert info["shadow"]["enabled"] is True and info["shadow"]["rate"] == 1.0
        # taking turns with the model by default, in small batches, with the model's threads (0: the model's)
        assert (info["shadow"]["serial"], info["shadow"]["batch"]) == (True, 4)
        assert info["shadow"]["threads"] == info["threads"]
        model = info["shadow"]["model"]
        assert (model["teacher"], model["registry_version"], model["format"], model["device"]) == (
            "tiny-teacher", "5", "onnx", "cpu")
        assert info["reference"] == {"split": "test", "texts": 20, "agreement_with_teacher": 0.9,
                                     "agreement_with_teacher_ci": [0.85, 0.94]}
        assert info["drift"] == {"enabled": True, "window": 20, "min_texts": 20}


def test_a_disagreeing_shadow_and_a_full_queue_are_counted_and_the_answers_stay_right(served, tmp_path):
    """Shadow = the served weights with the label names swapped: it never agrees. A queue of one text drops most of
    a burst: dropped counted, never waited for; every text is either compared or dropped."""
    _, folder, _ = served
    tag = bento_model(served, tmp_path, "shadow-reversed",
                      shadow=teacher_like(folder, tmp_path / "teacher", labels=["fresh", "rotten"]))
    settings = {"DISTILOPS_BENTO_MODEL": tag, "DISTILOPS_SHADOW_RATE": "1", "DISTILOPS_SHADOW_QUEUE": "1"}
    with another_server(served, "shadow-reversed", **settings) as server:
        server.wait_ready()
        answers = classify_all(server, SHADOW_TEXTS)
        expected = TextClassifier(folder).classify(SHADOW_TEXTS)
        assert [a["label"] for a in answers] == [e.label for e in expected]
        n = len(SHADOW_TEXTS)
        scraped = metrics_when(server, lambda m: (shadow_counts(m)[0] or 0) + (shadow_counts(m)[2] or 0) == n)
        compared, agreed, dropped = shadow_counts(scraped)
        assert dropped > 0 and compared > 0 and agreed == 0
        assert sample(scraped, "distilops_live_agreement", model_version="7") == 0.0
        assert "distilops_drift_psi" not in scraped  # no reference in this model folder


def test_a_failing_shadow_is_counted_and_logged_once_and_serving_carries_on(served, tmp_path):
    """The shadow fails on every batch holding the word "film": those texts are counted as failed, one log line says
    so (at most one a minute), the thread lives on and compares later texts; the pod stays ready."""
    _, folder, _ = served
    tag = bento_model(served, tmp_path, "shadow-failing", shadow=teacher_like(folder, tmp_path / "teacher",
                                                                             broken_word="film"))
    failing = [t for t in SHADOW_TEXTS if "film" in t.split()][:5]
    fine = [t.replace("film", "story") for t in SHADOW_TEXTS]
    with another_server(served, "shadow-failing", DISTILOPS_BENTO_MODEL=tag, DISTILOPS_SHADOW_RATE="1") as server:
        server.wait_ready()
        for text in failing:  # one at a time: several failed batches
            assert post(server, {"texts": [text]}).status_code == 200
        failed = lambda m: sample(m, "distilops_shadow_failed", "distilops_shadow_failed_total")  # noqa: E731
        metrics_when(server, lambda m: failed(m) == len(failing))
        classify_all(server, fine)
        scraped = metrics_when(server, lambda m: shadow_counts(m)[0] == len(fine))
        assert shadow_counts(scraped) == (len(fine), len(fine), 0) and failed(scraped) == len(failing)
        assert probe_status(server, "/readyz") == 200 and probe_status(server, "/livez") == 200
        assert server.log.read_text().count("shadow model failed; the texts it was scoring are not compared") == 1


def test_rate_zero_shadows_nothing_and_a_model_without_reference_has_no_drift(served, tmp_path):
    _, folder, _ = served
    tag = bento_model(served, tmp_path, "shadow-off", shadow=teacher_like(folder, tmp_path / "teacher"))
    with another_server(served, "shadow-off", DISTILOPS_BENTO_MODEL=tag, DISTILOPS_SHADOW_RATE="0") as server:
        server.wait_ready()
        classify_all(server, SHADOW_TEXTS)
        scraped = scrape(httpx.get(server.url + "/metrics").text)
        assert shadow_counts(scraped) == (0, 0, 0)
        assert sample(scraped, "distilops_text_words", "distilops_text_words_count") == len(SHADOW_TEXTS)
        for family in ("distilops_live_agreement", "distilops_drift_psi", "distilops_reference_agreement"):
            assert family not in scraped, family
        info = httpx.get(server.url + "/model").json()
        assert info["shadow"]["enabled"] is False and info["shadow"]["reason"] == "DISTILOPS_SHADOW_RATE is 0"
        assert info["shadow"]["model"]["teacher"] == "tiny-teacher"  # there, but off
        assert info["reference"] is None
        assert info["drift"]["enabled"] is False and info["drift"]["reason"].startswith("no reference")


def test_a_shadow_rate_without_a_shadow_model_serves_without_and_says_why(served):
    with another_server(served, "no-shadow-folder", DISTILOPS_SHADOW_RATE="0.5") as server:
        server.wait_ready()
        assert post(server, {"texts": ["a moving film"]}).status_code == 200
        shadow = httpx.get(server.url + "/model").json()["shadow"]
        assert shadow["enabled"] is False and shadow["model"] is None
        assert shadow["reason"].startswith(f"no shadow model: the Bento model has no {SHADOW_SUBDIR}/ folder")
        assert server.log.read_text().count("DISTILOPS_SHADOW_RATE=0.5 but no shadow model") == 1


@pytest.mark.parametrize("name,value,meaning", [
    ("DISTILOPS_SHADOW_RATE", "1.5", "a fraction between 0 and 1"),
    ("DISTILOPS_SHADOW_RATE", "often", "a fraction between 0 and 1"),
    ("DISTILOPS_DRIFT_WINDOW", "0", "a whole number >= 1"),
    ("DISTILOPS_SHADOW_BATCH", "0", "a whole number >= 1"),
    ("DISTILOPS_SHADOW_SERIAL", "sometimes", "a boolean: 1/0, true/false, yes/no, on/off"),
    ("DISTILOPS_DISPATCH", "eager", "continuous or adaptive"),
])
def test_a_bad_live_fidelity_setting_stops_the_service_with_one_line(served, name, value, meaning):
    server, _, _ = served
    bentoml_cli = str(Path(sys.executable).parent / "bentoml")
    result = subprocess.run([bentoml_cli, "serve", "distilops.serving.service:Classifier", "--port", str(free_port())],
                            cwd=SRC, env={**server.env, name: value}, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"distilops service: {name}={value!r}: must be {meaning}" in result.stderr
    assert "Traceback" not in result.stderr

"""The serving image for real: `distilops image` builds it with buildah from the promoted registry version,
then podman runs it under exactly the CPU Deployment's security context (tests/containers.py reads it from
the rendered manifest) with no network but loopback, and the service is called from inside the container."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from containers import RUNTIME, container_args, missing_tools, podman_args, render
from test_benchmarks import run_benchmark
from tiny import distinct, make_tiny_model, make_wheel

from distilops.config import PromoteConfig
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.quantize import build
from distilops.release.registry import link_release, promote, register_version
from distilops.serving.inference import TextClassifier
from distilops.tracking import stage_run

BUILD_S = 1500  # one `distilops image` run at most (a cold base image, the wheels downloaded)
# pytest's global timeout (pyproject: 600 s) counts a test's fixtures too: the first test here builds the image in
# the `built` fixture, and the deploy test builds twice more. Each test gets the builds it may wait for, plus 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_S + 600)]
ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-sentiment"
REPOSITORY = "localhost/distilops-test-classifier"
TEXTS = ["a wonderful, moving film", "tedious and dull", "the plot is messy but the acting is superb"]

# Runs inside the container (its own Python and httpx): waits for readiness, then calls the service.
PROBE = textwrap.dedent("""
    import json, time, httpx
    url, out, start = "http://127.0.0.1:3000", {}, time.monotonic()
    while time.monotonic() - start < WAIT:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    out["ready_after_s"] = time.monotonic() - start
    out["readyz"] = httpx.get(url + "/readyz", timeout=5).status_code
    out["livez"] = httpx.get(url + "/livez", timeout=5).status_code
    if out["readyz"] == 200:
        reply = httpx.post(url + "/classify", json={"texts": TEXTS}, timeout=30)
        out["classify"] = [reply.status_code, reply.json(), reply.headers.get("x-model-version")]
        out["model"] = httpx.get(url + "/model", timeout=5).json()
        bad = httpx.post(url + "/classify", json={"texts": [""]}, timeout=30)
        out["bad"] = [bad.status_code, bad.text]
    print(json.dumps(out))
""").replace("TEXTS", json.dumps(TEXTS))


def probe(wait_s: float) -> str:
    return PROBE.replace("WAIT", str(wait_s))


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:4])} failed: {result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny distilled model's ONNX int8 variant registered twice (v1, v2), v2 promoted, its image built."""
    missing = missing_tools()
    assert not missing, f"the container test needs {missing}: `make test-tools` installs them (as root, Debian)"
    root = tmp_path_factory.mktemp("image")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "BENTOML_HOME": str(root / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true"}
    raw = make_tiny_model(root / "raw", layers=2)
    student = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), root / "student",
                                max_length=16, teacher="tiny-teacher")
    variant = build("onnx_int8", student, root / "quantized")
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    with pytest.MonkeyPatch.context() as patch:  # the caller's MLFLOW_TRACKING_URI comes back on the way out
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        with stage_run("register"):
            for _ in range(2):
                mv = register_version(distinct(variant), model_name=NAME, variant="onnx_int8", role="serving",
                                      device="cpu",
                                      metrics={"accuracy": 0.9, "teacher_accuracy": 0.91, "latency_p95_ms": 2.0})
                link_release(NAME, {"cpu": mv.version})
        promote(NAME, PromoteConfig(model_name=NAME), version=mv.version)
    distilops = str(Path(sys.executable).parent / "distilops")
    started = time.monotonic()
    # A repository of its own: the test must not replace (then delete) an image a user built for their version 2.
    result = subprocess.run([distilops, "image", "--device", "cpu", "-m", NAME, "--repository", REPOSITORY],
                            cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=BUILD_S)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"image built in {time.monotonic() - started:.0f} s: {result.stderr.strip().splitlines()[-1]}")
    ref = result.stdout.strip().splitlines()[-1]
    yield {"ref": ref, "version": str(mv.version), "env": env, "folder": variant}
    podman("rmi", "-f", ref, check=False)


def run_like_the_deployment(ref: str, name: str, extra_env: dict[str, str] | None = None, wait_s: float = 120) -> dict:
    """Start the image as the CPU Deployment's pod would run, call it from inside, return what it said."""
    documents = render("cpu")
    extra = [arg for key, value in (extra_env or {}).items() for arg in ("--env", f"{key}={value}")]
    podman("rm", "-f", name, check=False)
    podman("run", "-d", "--name", name, "--network", "none", *podman_args(documents), *extra, ref,
           *container_args(documents))
    try:
        said = podman("exec", name, "/opt/venv/bin/python", "-c", probe(wait_s), timeout=wait_s + 60)
        result = json.loads(said.stdout.strip().splitlines()[-1])
        logs = podman("logs", name, check=False)
        result["logs"] = logs.stdout + logs.stderr
        result["inspect"] = json.loads(podman("inspect", name).stdout)[0]
        return result
    finally:
        podman("rm", "-f", name, check=False)


def test_the_image_holds_no_torch_and_no_cuda(built):
    check = ("import importlib.util as u; "
             "print([m for m in ('torch', 'transformers', 'mlflow', 'onnxruntime', 'tokenizers') if u.find_spec(m)])")
    found = podman("run", "--rm", "--entrypoint", "/opt/venv/bin/python", *RUNTIME, built["ref"], "-c", check).stdout
    assert found.strip() == "['onnxruntime', 'tokenizers']"
    libraries = podman("run", "--rm", "--entrypoint", "/bin/sh", *RUNTIME, built["ref"], "-c",
                       "find / -xdev \\( -name 'libcud*' -o -name 'libcublas*' -o -name 'libnvrtc*' \\) | head").stdout
    assert libraries.strip() == ""


def test_the_container_serves_the_promoted_version_under_the_deployments_security_context(built):
    result = run_like_the_deployment(built["ref"], "distilops-test-cpu")
    config = result["inspect"]["HostConfig"]
    assert result["inspect"]["Config"]["User"] == "1034:1034"
    assert config["ReadonlyRootfs"] is True and "no-new-privileges" in config["SecurityOpt"]
    assert config["CapDrop"] and not config["CapAdd"] and config["NetworkMode"] == "none"
    assert result["readyz"] == 200 and result["livez"] == 200, result["logs"][-3000:]
    print(f"ready {result['ready_after_s']:.1f} s after the probe started")

    status, answers, header_version = result["classify"]
    model = TextClassifier(built["folder"])
    expected = [model.classify([text])[0] for text in TEXTS]  # one text per call, as the service runs them
    assert status == 200 and header_version == built["version"]
    assert [a["label"] for a in answers] == [e.label for e in expected]
    assert [a["score"] for a in answers] == pytest.approx([e.score for e in expected], abs=1e-5)

    model = result["model"]
    assert (model["registry_name"], model["registry_version"]) == (NAME, built["version"])
    assert model["variant"] == "onnx_int8" and model["format"] == "onnx"
    assert model["providers"] == ["CPUExecutionProvider"] and model["threads"] == 2  # the CPU limit, not the node's
    assert result["bad"][0] == 400 and "empty or only whitespace" in result["bad"][1]


def test_a_gpu_pod_without_cuda_is_never_ready_and_says_why(built):
    """The CPU image has no CUDA provider: with DISTILOPS_REQUIRE_GPU=1 (the GPU overlay) it must not serve."""
    result = run_like_the_deployment(built["ref"], "distilops-test-gpu-refused", {"DISTILOPS_REQUIRE_GPU": "1"},
                                     wait_s=20)
    assert result["livez"] == 200 and result["readyz"] == 503
    assert "DISTILOPS_REQUIRE_GPU=1 but ONNX Runtime runs this model on ['CPUExecutionProvider']" in result["logs"]


def test_the_image_is_recorded_on_the_registry_version(built):
    uri = built["env"]["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the registry another test set
    tags = client.get_model_version(NAME, built["version"]).tags
    assert tags["image.ref"] == built["ref"] == f"{REPOSITORY}:v{built['version']}-cpu"
    image = json.loads(podman("image", "inspect", built["ref"]).stdout)[0]
    assert tags["image.id"] == image["Id"] and tags["image.digest"] == image["Digest"].strip()
    assert image["Config"]["Labels"]["ai.distilops.registry-version"] == built["version"]


def test_stopping_the_container_under_load_completes_every_request_in_flight(built):
    """What a rollout or a node drain does to a pod: endpoints drop it (the preStop sleep), no new request
    arrives, then SIGTERM. Every request in flight at that moment must still get its answer, and the container
    must exit well within the grace period the Deployment gives it."""
    import threading
    from collections import Counter

    import httpx
    from serving import free_port, wait_ready

    documents = render("cpu")
    args, port = container_args(documents), free_port()
    args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", str(port)  # host network
    grace = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    name, url = "distilops-test-drain", f"http://127.0.0.1:{port}"
    podman("rm", "-f", name, check=False)
    podman("run", "-d", "--name", name, "--network", "host", *podman_args(documents), built["ref"], *args)
    try:
        wait_ready(url + "/readyz", 120, detail=lambda: podman("logs", name, check=False).stderr[-3000:])
        long_text = " ".join(["a wonderful film with superb acting but a messy plot"] * 40)  # several windows
        stop, results, lock = threading.Event(), [], threading.Lock()

        def client() -> None:  # a new connection per request: no idle keep-alive connection to race with
            with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as http:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        outcome = http.post(url + "/classify", json={"texts": [long_text] * 2}).status_code
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    with lock:
                        results.append((started, time.monotonic(), outcome))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(4)
        stop.set()  # the endpoints have dropped the pod: no new request from here
        stopped = time.monotonic()
        halted = podman("stop", "--time", str(grace), name, timeout=grace + 60)  # SIGTERM, SIGKILL after `grace`
        exited = time.monotonic() - stopped
        for thread in threads:
            thread.join(timeout=120)
        in_flight = Counter(outcome for started, ended, outcome in results if started < stopped < ended)
        print(f"{len(results)} requests, {sum(in_flight.values())} in flight at SIGTERM: {dict(in_flight)}; "
              f"exited after {exited:.1f} s")
        assert halted.returncode == 0
        assert sum(in_flight.values()) >= 4 and set(in_flight) == {200}, in_flight
        assert {outcome for *_, outcome in results} == {200}
        assert exited < grace - 5  # drained by the service, not killed at the deadline
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, state  # a clean shutdown, not a SIGKILL (137)
    finally:
        podman("rm", "-f", name, check=False)


@pytest.mark.timeout(3 * BUILD_S + 600)  # the fixture's build (when run alone), then a build and a rebuild
def test_deploy_pins_the_digest_of_the_push_and_follows_a_rebuild(built, tmp_path):
    """A real registry (Debian's docker-registry): an image never pushed is refused; `distilops image --push`
    pushes it and deploy pins the digest the registry reports; a rebuild pushed again pins its new digest."""
    from services import ImageRegistry

    from distilops.release.oci import manifest_digest

    distilops, env = str(Path(sys.executable).parent / "distilops"), built["env"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([distilops, *args, "-m", NAME], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=BUILD_S)

    never = cli("deploy", "--overlay", "cpu")
    assert never.returncode == 1 and "was never pushed, and no node can pull a local image" in never.stderr
    with ImageRegistry(tmp_path / "oci") as oci:
        target = f"{oci.host}/ml"
        digests = []
        for _ in range(2):  # the first push, then a rebuild pushed again
            pushed = cli("image", "--device", "cpu", "--repository", REPOSITORY, "--push", target, "--no-tls-verify")
            assert pushed.returncode == 0, pushed.stderr[-3000:]
            ref = f"{target}/distilops-classifier:v{built['version']}-cpu"
            digests.append(manifest_digest(ref, tls_verify=False))
            deployed = cli("deploy", "--overlay", "cpu", "--no-tls-verify")
            assert deployed.returncode == 0, deployed.stderr[-3000:]
            assert f"image: {ref}@{digests[-1]}" in deployed.stdout
        assert digests[0] != digests[1]  # a new build is a new image: the pods follow it


def test_container_benchmark(built, tmp_path):
    """benchmarks/container_benchmark.py on the image built here against its Bento served from the venv (the
    folder `distilops image` left in its build context, the script's default): one cold start and one second of
    load an arm; each arm answers every request, and the container serves the promoted version."""
    data = tmp_path / "texts.parquet"
    pd.DataFrame({"text": TEXTS * 4}).to_parquet(data)
    out = tmp_path / "container.json"
    run_benchmark("container_benchmark.py", "--image", built["ref"], "--data", str(data), "--connections", "2",
                  "--seconds", "1", "--repeats", "1", "--cold-starts", "1", "--out", str(out), env=built["env"],
                  timeout=600)
    result = json.loads(out.read_text())
    assert result["protocol"]["image"] == built["ref"]
    served = result["protocol"]["served"]
    assert (served["registry_name"], served["registry_version"], served["variant"]) == (NAME, built["version"],
                                                                                      "onnx_int8")
    assert {arm: len(starts) for arm, starts in result["cold_start_s"].items()} == {"venv": 1, "container": 1}
    for arm in ("venv", "container"):
        summary = result["summary"][arm]
        assert summary["cold_start_s_median"] > 0 and summary["requests_per_second"] > 0 and summary["errors"] == 0
        assert summary["latency_p50_ms"] <= summary["latency_p99_ms"]
    assert result["ratios"]["container / venv throughput"] > 0


def test_image_sizes_reports_the_built_image(built, tmp_path):
    """benchmarks/image_sizes.py's --images: podman's size and digest of the image built here (its package sets
    from a tiny local wheel: tests/test_benchmarks.py measures those)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "lean", 200_000)  # 0.2 MB: the ratios divide by it, rounded to 0.1 MB
    out = tmp_path / "sizes.json"
    sets = {name: ["lean"] for name in ("before (one image)", "cpu", "gpu")}
    run_benchmark("image_sizes.py", "--sets", json.dumps(sets), "--find-links", str(wheels), "--images", built["ref"],
                  "--out", str(out))
    image = json.loads(podman("image", "inspect", built["ref"]).stdout)[0]
    assert json.loads(out.read_text())["images"] == {
        built["ref"]: {"size_mb": round(image["Size"] / 1e6, 1), "digest": image["Digest"]}}
    assert image["Size"] > 50e6  # a real image (Python, the service's packages), not an empty reference

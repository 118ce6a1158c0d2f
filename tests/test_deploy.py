"""One release, one version per device, and `distilops deploy`: a real SQLite registry, the real overlays
rendered by kubectl and validated against the Kubernetes schemas. Images are recorded as `distilops image`
records them (test_container.py builds one for real); no cluster runs here, so `--apply` is not exercised."""

import kubernetes_validate
import pytest
import yaml
from tiny import make_tiny_model
from typer.testing import CliRunner

from distilops.cli import app
from distilops.config import PromoteConfig
from distilops.errors import DeployError, RegistryError
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.release.deploy import LABEL, pin, render, render_overlay, validate
from distilops.release.package import resolve
from distilops.release.registry import client, latest_serving_version, link_release, promote, register_version
from distilops.tracking import stage_run

NAME = "tiny-sentiment"
GATES = PromoteConfig(model_name=NAME, max_latency_p95_ms=20.0)
METRICS = {"accuracy": 0.85, "teacher_accuracy": 0.86, "latency_p95_ms": 2.0}


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """Two releases, each a CPU version and its GPU sibling, each with an image recorded; release 1 promoted."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DISTILOPS_USER", "alice")
    raw = make_tiny_model(tmp_path / "raw")
    folder = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), tmp_path / "student",
                               max_length=16, teacher="tiny-teacher")
    releases = []
    c = client()  # points MLflow at this test's store (a client made before would keep the last test's)
    with stage_run("register"):
        for _ in range(2):
            versions = {}
            for device, variant in (("cpu", "onnx_int8"), ("gpu", "onnx_fp16")):
                mv = register_version(folder, model_name=NAME, metrics=METRICS,
                                      variant=variant, role="serving", device=device)
                versions[device] = str(mv.version)
                c.set_model_version_tag(NAME, mv.version, "image.ref",
                                        f"localhost/distilops-classifier:v{mv.version}-{device}")
            link_release(NAME, versions)
            releases.append(versions)
    promote(NAME, GATES, version=releases[0]["cpu"])
    return releases


def deployment(rendered):
    return next(d for d in rendered.documents if d["kind"] == "Deployment")


def test_the_gpu_sibling_follows_its_release(registry):
    first, second = registry
    assert str(latest_serving_version(client(), NAME).version) == second["cpu"]  # never the GPU one
    # What `distilops package|image --device` pick (package then copies that version into the BentoML store:
    # test_service.py; not here, as BentoML fixes its store's folder once per process).
    release, served = resolve(NAME, device="gpu")
    assert (str(served.version), str(release.version), served.tags["variant"]) == (first["gpu"], first["cpu"],
                                                                                   "onnx_fp16")
    assert str(resolve(NAME, device="cpu")[1].version) == first["cpu"]


def test_a_release_without_a_gpu_variant_is_a_clear_error(registry, tmp_path):
    folder = tmp_path / "student"
    with stage_run("register"):
        lone = register_version(folder, model_name=NAME, metrics=METRICS,
                                variant="onnx_int8", role="serving", device="cpu")
    with pytest.raises(RegistryError, match=f"version {lone.version} of '{NAME}' has no GPU variant"):
        resolve(NAME, version=str(lone.version), device="gpu")


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_deploy_pins_the_production_image_and_labels_the_pods(registry, overlay):
    first, _ = registry
    served = first[overlay]
    rendered = render(NAME, overlay=overlay, registry="registry.example.com/ml")
    container = deployment(rendered)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"registry.example.com/ml/distilops-classifier:v{served}-{overlay}"
    template = deployment(rendered)["spec"]["template"]["metadata"]
    assert template["labels"][LABEL] == served
    assert template["annotations"]["distilops.ai/release-version"] == first["cpu"]
    cause = deployment(rendered)["metadata"]["annotations"]["kubernetes.io/change-cause"]
    assert f"{NAME} v{served}" in cause  # what `kubectl rollout history` lists
    assert "replicas" not in deployment(rendered)["spec"]


def test_a_pushed_digest_is_pinned(registry):
    first, _ = registry
    c = client()
    pushed = f"registry.example.com/ml/distilops-classifier:v{first['cpu']}-cpu"
    c.set_model_version_tag(NAME, first["cpu"], "image.pushed", pushed)
    c.set_model_version_tag(NAME, first["cpu"], "image.pushed_digest", "sha256:" + "a" * 64)
    image = render(NAME, overlay="cpu", registry="registry.example.com/ml").image
    assert image == f"{pushed}@sha256:{'a' * 64}"
    assert render(NAME, overlay="cpu", registry="other.example.com/x").image.endswith(f":v{first['cpu']}-cpu")


def test_rollback_re_pins_the_previous_image(registry):
    first, second = registry
    promote(NAME, GATES, version=second["cpu"])
    assert render(NAME, overlay="gpu").image == f"localhost/distilops-classifier:v{second['gpu']}-gpu"
    promote(NAME, GATES, rollback=True)
    assert render(NAME, overlay="gpu").image == f"localhost/distilops-classifier:v{first['gpu']}-gpu"


def test_a_version_without_an_image_is_refused(registry, tmp_path):
    with stage_run("register"):
        bare = register_version(tmp_path / "student", model_name=NAME, metrics=METRICS,
                                variant="onnx_int8", role="serving", device="cpu")
    with pytest.raises(DeployError, match=f"version {bare.version} has no image: build it first"):
        render(NAME, overlay="cpu", version=str(bare.version))


def test_validation_is_strict(registry):
    documents = render_overlay("cpu")
    pin(documents, image="r/distilops-classifier:v1-cpu", registry_name=NAME, version="1", release="1",
        variant="onnx_int8")
    validate(documents)
    next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "imagePulPolicy"] = "Always"  # a typo
    with pytest.raises(DeployError, match="imagePulPolicy"):
        validate(documents)
    assert kubernetes_validate  # the same validator the manifest tests use


def test_deploy_command_prints_valid_manifests(registry):
    result = CliRunner().invoke(app, ["deploy", "--overlay", "gpu", "-m", NAME, "--registry", "r.example.com/ml"])
    assert result.exit_code == 0, result.output
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == f"r.example.com/ml/distilops-classifier:v{registry[0]['gpu']}-gpu"
    bad = CliRunner().invoke(app, ["deploy", "--overlay", "tpu", "-m", NAME])
    assert bad.exit_code == 1 and "unknown overlay 'tpu'" in bad.output and "Traceback" not in bad.output


def test_the_packaged_model_carries_no_tracking_credentials():
    from distilops.tracking import redact_uri

    assert redact_uri("https://alice:s3cret@mlflow.example.com:5000/") == "https://***@mlflow.example.com:5000/"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"

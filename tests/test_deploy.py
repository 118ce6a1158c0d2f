"""One release, one version per device, and `distilops deploy`: a real SQLite registry, the real overlays
rendered by kubectl and validated against the Kubernetes schemas. Images are recorded as `distilops image`
records them (test_container.py builds and pushes one for real). Pinning asks a real image registry
(Debian's docker-registry on 127.0.0.1) in the tests marked slow; the others render with the digest
recorded at the push (--skip-registry-check). `--apply` runs on a real control plane: test_control_plane.py."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from releases import GATES, METRICS, NAME, PUSHED_TO, make_releases
from tiny import distinct, make_tiny_model
from typer.testing import CliRunner

from distilops.cli import app
from distilops.errors import DeployError, RegistryError
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.release.deploy import LABEL, job_containers, pin, render, render_jobs, render_overlay, validate
from distilops.release.package import resolve
from distilops.release.registry import client, latest_serving_version, promote, register_version
from distilops.tracking import stage_run


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """Two releases, each a CPU version and its GPU sibling, each with an image recorded; release 1 promoted."""
    return make_releases(tmp_path, monkeypatch)


def offline(overlay: str, **kwargs):
    return render(NAME, overlay=overlay, check_registry=False, **kwargs)


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
        lone = register_version(distinct(folder), model_name=NAME, metrics=METRICS,
                                variant="onnx_int8", role="serving", device="cpu")
    with pytest.raises(RegistryError, match=f"version {lone.version} of '{NAME}' has no GPU variant"):
        resolve(NAME, version=str(lone.version), device="gpu")


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_deploy_pins_the_production_image_and_labels_the_pods(registry, overlay):
    first, _ = registry
    served = first[overlay]
    rendered = offline(overlay)  # the registry it was pushed to, the digest recorded at the push
    container = deployment(rendered)["spec"]["template"]["spec"]["containers"][0]
    digest = "sha256:" + f"{int(served) + 100:064x}"
    assert container["image"] == f"{PUSHED_TO}/distilops-classifier:v{served}-{overlay}@{digest}"
    template = deployment(rendered)["spec"]["template"]["metadata"]
    assert template["labels"][LABEL] == served
    assert template["annotations"]["distilops.ai/release-version"] == first["cpu"]
    cause = deployment(rendered)["metadata"]["annotations"]["kubernetes.io/change-cause"]
    assert f"{NAME} v{served}" in cause  # what `kubectl rollout history` lists
    assert "replicas" not in deployment(rendered)["spec"]


def test_an_image_that_was_never_pushed_is_refused(registry):
    """A local reference (localhost/...) renders fine and no node can pull it: deploy refuses it."""
    first, _ = registry
    c = client()
    c.delete_model_version_tag(NAME, first["cpu"], "image.pushed")
    with pytest.raises(DeployError, match=f"version {first['cpu']}'s image localhost/distilops-classifier:"
                                          f"v{first['cpu']}-cpu was never pushed"):
        offline("cpu")


def test_a_rebuild_that_was_not_pushed_is_refused(registry):
    """After `distilops image` rebuilds a version's image without `--push`, the recorded digest is the old
    build's: pinning it would run an image that is no longer what the version's image is."""
    first, _ = registry
    client().set_model_version_tag(NAME, first["cpu"], "image.id", "f" * 64)  # a new build, not pushed
    with pytest.raises(DeployError, match="was rebuilt .* after it was pushed"):
        offline("cpu")


def test_skipping_the_registry_check_needs_a_recorded_push_to_that_registry(registry):
    with pytest.raises(DeployError, match="no push of version .* to other.example.com/x is recorded"):
        offline("cpu", registry="other.example.com/x")


def test_rollback_re_pins_the_previous_image(registry):
    first, second = registry
    promote(NAME, GATES, version=second["cpu"])
    assert offline("gpu").image.startswith(f"{PUSHED_TO}/distilops-classifier:v{second['gpu']}-gpu@sha256:")
    promote(NAME, GATES, rollback=True)
    assert offline("gpu").image.startswith(f"{PUSHED_TO}/distilops-classifier:v{first['gpu']}-gpu@sha256:")


def test_a_version_without_an_image_is_refused(registry, tmp_path):
    with stage_run("register"):
        bare = register_version(distinct(tmp_path / "student"), model_name=NAME, metrics=METRICS,
                                variant="onnx_int8", role="serving", device="cpu")
    with pytest.raises(DeployError, match=f"version {bare.version} has no image: build it first"):
        offline("cpu", version=str(bare.version))


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
    result = CliRunner().invoke(app, ["deploy", "--overlay", "gpu", "-m", NAME, "--skip-registry-check"])
    assert result.exit_code == 0, result.output
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"].startswith(f"{PUSHED_TO}/distilops-classifier:v{registry[0]['gpu']}-gpu@")
    bad = CliRunner().invoke(app, ["deploy", "--overlay", "tpu", "-m", NAME])
    assert bad.exit_code == 1 and "unknown overlay 'tpu'" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_the_packaged_model_carries_no_tracking_credentials(tmp_path, monkeypatch):
    """Packaged from a tracking server whose URI holds a password: the password is nowhere in the Bento model
    (its files, labels, metadata), which records the URI redacted."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from services import mlflow_server

    server = mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts", tmp_path / "server.log")
    try:
        server.wait_ready(timeout=120)
        host = server.url.removeprefix("http://")
        uri = f"http://alice:s3cret-pw@{host}"  # the server ignores it; the client sends it as basic auth
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        raw = make_tiny_model(tmp_path / "raw")
        folder = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), tmp_path / "student",
                                   max_length=16, teacher="tiny-teacher")
        with stage_run("register"):
            version = register_version(distinct(folder), model_name=NAME, metrics=METRICS, variant="onnx_int8",
                                       role="serving", device="cpu").version
        (tmp_path / "params.yaml").write_text(f"model_name: {NAME}\npromote:\n  alias: production\n")
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "BENTOML_HOME": str(tmp_path / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "true"}
        done = subprocess.run([str(Path(sys.executable).parent / "distilops"), "package", "--version", str(version),
                               "--params", str(tmp_path / "params.yaml")], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "s3cret-pw" not in done.stdout + done.stderr
    name, tag = done.stdout.strip().splitlines()[-1].split(":")
    bento_model = tmp_path / "bentoml" / "models" / name / tag
    files = [p for p in bento_model.rglob("*") if p.is_file()]
    assert len(files) > 5 and not [p for p in files if b"s3cret-pw" in p.read_bytes()]
    metadata = yaml.safe_load((bento_model / "model.yaml").read_text())["metadata"]
    assert metadata["tracking_uri"] == f"http://***@{host}"  # where it came from, without the secret


@pytest.mark.slow
def test_deploy_pins_the_digest_the_registry_reports_and_refuses_what_it_lacks(registry, tmp_path):
    """A real registry: deploy asks it which digest the tag names and pins that; a tag it does not hold, and a
    tag overwritten by another image since this version's push, are refused before any pod tries to pull."""
    from services import ImageRegistry

    first, second = registry
    c = client()
    with ImageRegistry(tmp_path / "oci") as oci:
        target = f"{oci.host}/ml"
        pushed = oci.push("ml/distilops-classifier", f"v{first['cpu']}-cpu", b"the first release's image")
        ref = f"{target}/distilops-classifier:v{first['cpu']}-cpu"
        c.set_model_version_tag(NAME, first["cpu"], "image.pushed", ref)
        c.set_model_version_tag(NAME, first["cpu"], "image.pushed_digest", pushed)
        image = render(NAME, overlay="cpu", tls_verify=False).image
        assert image == f"{ref}@{pushed}"

        result = CliRunner().invoke(app, ["deploy", "--overlay", "cpu", "-m", NAME, "--no-tls-verify"])
        assert result.exit_code == 0 and f"@{pushed}" in result.stdout, result.output

        # Someone pushes another image under the same tag: the registry's digest is no longer this version's.
        oci.push("ml/distilops-classifier", f"v{first['cpu']}-cpu", b"something else")
        with pytest.raises(DeployError, match="the tag was overwritten"):
            render(NAME, overlay="cpu", tls_verify=False)

        # A version whose image never reached this registry.
        promote(NAME, GATES, version=second["cpu"])
        missing = CliRunner().invoke(app, ["deploy", "--overlay", "cpu", "-m", NAME, "--registry", target,
                                           "--no-tls-verify"])
        assert missing.exit_code == 1 and "Traceback" not in missing.output
        assert f"{target}/distilops-classifier:v{second['cpu']}-cpu is not in the registry: push it first" in \
            missing.output
    with pytest.raises(DeployError, match=f"cannot reach the image registry {oci.host}"):
        render(NAME, overlay="cpu", registry=target, tls_verify=False)


def job_images(documents: list[dict]) -> set[str]:
    return {c["image"] for c in job_containers(documents)}


def test_jobs_render_with_a_given_digest_and_refuse_a_bare_tag_offline():
    digest = "sha256:" + "ab" * 32
    documents = render_jobs(f"{PUSHED_TO}/distilops-pipeline@{digest}", check_registry=False)
    assert job_images(documents) == {f"{PUSHED_TO}/distilops-pipeline@{digest}"}
    with pytest.raises(DeployError, match="is a tag: without asking the registry, give the digest"):
        render_jobs(f"{PUSHED_TO}/distilops-pipeline:v1", check_registry=False)
    result = CliRunner().invoke(app, ["jobs", "--image", f"{PUSHED_TO}/distilops-pipeline@{digest}",
                                      "--skip-registry-check"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count(f"@{digest}") == 3 and "unpinned" not in result.stdout


def test_the_training_job_is_sized_from_params(tmp_path):
    """`distilops jobs --training`: k8s/train with teacher.distributed's nodes as pods, its processes as GPUs each."""
    digest = "sha256:" + "ab" * 32
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["teacher"]["distributed"] = {"processes": 4, "nodes": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["jobs", "--training", "--image", f"{PUSHED_TO}/distilops-pipeline@{digest}",
                                      "--skip-registry-check", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Job"]
    assert job["metadata"]["name"] == "distilops-train" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{PUSHED_TO}/distilops-pipeline@{digest}"
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 4


@pytest.mark.slow
def test_jobs_pin_the_digest_the_registry_reports(tmp_path):
    """A retried pipeline pod must run its first attempt's image: the tag is resolved once, to a digest."""
    from services import ImageRegistry

    with ImageRegistry(tmp_path / "oci") as oci:
        image = f"{oci.host}/ml/distilops-pipeline"
        first = oci.push("ml/distilops-pipeline", "2026-11", b"pipeline image, first build")
        assert job_images(render_jobs(f"{image}:2026-11", tls_verify=False)) == {f"{image}@{first}"}
        second = oci.push("ml/distilops-pipeline", "2026-11", b"pipeline image, rebuilt")  # the tag moves
        assert job_images(render_jobs(f"{image}:2026-11", tls_verify=False)) == {f"{image}@{second}"} != {first}
        with pytest.raises(DeployError, match=f"{image}:never-pushed is not in the registry"):
            render_jobs(f"{image}:never-pushed", tls_verify=False)
        with pytest.raises(DeployError, match="name the tag you pushed"):
            render_jobs(image, tls_verify=False)


# --- --strategy canary: rendered offline; applied to the stand-in API server of test_cluster.py ---------------


def test_canary_strategy_renders_the_rollout_over_the_pinned_deployment(registry):
    first, _ = registry
    rendered = offline("cpu", strategy="canary")
    kinds = [d["kind"] for d in rendered.documents]
    assert {"Rollout", "AnalysisTemplate", "Deployment", "HorizontalPodAutoscaler"} <= set(kinds)
    assert rendered.strategy == "canary" and rendered.release == first["cpu"]
    template = deployment(rendered)["spec"]["template"]  # the Rollout's pods are the Deployment's template
    assert template["metadata"]["labels"][LABEL] == first["cpu"]
    assert template["spec"]["containers"][0]["image"] == rendered.image
    rollout = next(d for d in rendered.documents if d["kind"] == "Rollout")
    assert rollout["spec"]["workloadRef"]["name"] == deployment(rendered)["metadata"]["name"]
    with pytest.raises(DeployError, match="unknown strategy 'bluegreen'"):
        offline("cpu", strategy="bluegreen")
    result = CliRunner().invoke(app, ["deploy", "--overlay", "gpu", "--strategy", "canary", "-m", NAME,
                                      "--skip-registry-check"])
    assert result.exit_code == 0, result.output
    printed = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {"Rollout", "AnalysisTemplate"} <= {d["kind"] for d in printed}
    help_text = CliRunner().invoke(app, ["deploy", "--help"], env={"COLUMNS": "200"}).output
    assert "--strategy" in help_text and "canary" in help_text and "--timeout" in help_text


def kubeconfig(tmp_path, server: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": server}}],
        "users": [{"name": "nobody", "user": {"token": "stand-in"}}],  # (an empty user is refused)
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "nobody"}}]}))
    return str(path)


def test_a_canary_outcome_is_recorded_and_an_abort_returns_the_alias(registry, tmp_path, monkeypatch):
    """`deploy --strategy canary --apply` against the stand-in API server: the release the cluster serves is read
    from the Rollout's stable ReplicaSet, the manifests applied, the Rollout followed. Aborted: exit 1 with one
    line, `canary-aborted` recorded, the alias back on the stable release. Promoted: exit 0, `canary-promoted`."""
    from test_cluster import DEPLOYMENT_PATH, ROLLOUT_PATH, StandIn, replica_set, rollout, stand_in
    from test_cluster import deployment as live_deployment

    from distilops.release.registry import alias_version, history

    first, second = registry
    promote(NAME, GATES, version=second["cpu"])  # the new release: its canary is what deploy rolls out
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with stand_in() as server:
        monkeypatch.setenv("KUBECONFIG", kubeconfig(tmp_path, server))
        StandIn.replica_sets = [replica_set("6d4f", first["cpu"], first["cpu"])]  # the stable: release 1
        StandIn.objects[DEPLOYMENT_PATH] = live_deployment(second["cpu"], available=0)  # generation 7
        StandIn.objects[ROLLOUT_PATH] = rollout(phase="Degraded", abort=True, stable="6d4f", current="7b9c",
                                                workload=7, workload_observed="7",
                                                message='RolloutAborted: Metric "error-ratio" assessed Failed')
        # the stable template put back on the Deployment (a JSON patch): the Rollout is Healthy on the stable again
        StandIn.on_json_patch[DEPLOYMENT_PATH] = (ROLLOUT_PATH, rollout(phase="Healthy", stable="6d4f", current="6d4f",
                                                                        workload=7, workload_observed="7"))
        deploy = ["deploy", "--overlay", "cpu", "--strategy", "canary", "--apply", "-m", NAME, "--skip-registry-check"]
        aborted = CliRunner().invoke(app, deploy)
        assert aborted.exit_code == 1 and "Traceback" not in aborted.output
        (line,) = [line for line in aborted.output.splitlines() if line.startswith("error:")]  # (logs around it)
        assert line == (
            f'error: canary of release v{second["cpu"]} aborted: RolloutAborted: Metric "error-ratio" assessed Failed; '
            f'{NAME}@production moved back to v{first["cpu"]}, the version the cluster still serves')
        applied = {w["body"]["kind"] for w in StandIn.writes if w["content_type"] == "application/apply-patch+yaml"}
        assert {"Rollout", "AnalysisTemplate", "Deployment", "HorizontalPodAutoscaler"} <= applied
        assert str(alias_version(client(), NAME, "production").version) == first["cpu"]
        restored = [w for w in StandIn.writes if w["content_type"] == "application/json-patch+json"]
        assert [w["body"][0]["path"] for w in restored] == ["/spec/template"]
        assert restored[0]["body"][0]["value"]["metadata"]["labels"][LABEL] == first["cpu"]  # release 1's pods

        promote(NAME, GATES, version=second["cpu"])  # fixed, released again: Argo promotes it
        # still aborted (stable 6d4f) when deploy reads it; promoted once the new template is applied
        StandIn.on_apply[ROLLOUT_PATH] = rollout(phase="Healthy", stable="7b9c", current="7b9c", step=4, workload=7,
                                                 workload_observed="7")
        promoted = CliRunner().invoke(app, deploy)
        assert promoted.exit_code == 0, promoted.output
        assert f"canary promoted: {NAME} v{second['cpu']}" in promoted.output
        assert str(alias_version(client(), NAME, "production").version) == second["cpu"]
    events = [(e.action, e.from_version, e.to_version) for e in history(NAME)]
    assert events[:4] == [("canary-promoted", first["cpu"], second["cpu"]), ("promote", first["cpu"], second["cpu"]),
                          ("canary-aborted", second["cpu"], first["cpu"]), ("promote", first["cpu"], second["cpu"])]
    assert 'Metric "error-ratio" assessed Failed' in history(NAME)[2].reason
    listed = CliRunner().invoke(app, ["history", "-m", NAME]).output
    assert "canary-aborted" in listed and "canary-promoted" in listed
    # --rollback goes by promotions: from release 2 back to release 1, not to what a canary event names
    event, _ = promote(NAME, GATES, rollback=True)
    assert (event.from_version, event.to_version) == (second["cpu"], first["cpu"])

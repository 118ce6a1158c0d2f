"""Kubernetes manifests: every kustomization rendered (`kubectl kustomize`) and validated offline against
the official schemas, strict on unknown fields; then checks that the manifests fit the service they deploy."""

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from serving import PROBE_PATHS

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/cpu", "jobs")
K8S_VERSIONS = ("1.30.0", "1.33.0")


def render(kustomization: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: the manifests are rendered with `kubectl kustomize` (kustomize built in)"
    result = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / kustomization)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {k: render(k) for k in KUSTOMIZATIONS}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_validate_strictly(rendered, kustomization, version):
    for doc in rendered[kustomization]:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_an_unknown_field(rendered):
    deployment = one(rendered["overlays/cpu"], "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_base_has_every_serving_object(rendered):
    kinds = sorted(d["kind"] for d in rendered["base"])
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"])


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_objects_point_at_each_other(rendered, overlay):
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = pod_spec(deployment)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 3000}  # BentoML's port
    assert one(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"
    for kind in ("Service",):
        assert one(docs, kind)["spec"]["selector"].items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget",):
        assert one(docs, kind)["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    config = one(docs, "ConfigMap")
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]  # the hashed name
    secret = container["envFrom"][1]["secretRef"]
    assert secret["name"] == "distilops-credentials" and secret["optional"] is True


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_probes_call_endpoints_the_service_has(rendered, overlay):
    container = pod_spec(one(rendered[overlay], "Deployment"))["containers"][0]
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths <= set(PROBE_PATHS)  # test_service.py checks that the running server answers these
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # ready only once the model is loaded
    assert all(container[p]["httpGet"]["port"] == "http" for p in ("livenessProbe", "readinessProbe"))


def test_config_map_sets_every_setting_the_service_reads(rendered):
    service_code = (ROOT / "src/distilops/service.py").read_text()
    read = set(re.findall(r'os\.environ\.get\("(DISTILOPS_[A-Z_]+)"', service_code))
    read -= {"DISTILOPS_BENTO_MODEL", "DISTILOPS_ACCESS_LOG"}  # the Bento fixes the model; logs stay default
    data = one(rendered["base"], "ConfigMap")["data"]
    assert read and read <= set(data), f"not in the ConfigMap: {read - set(data)}"
    assert data["MLFLOW_TRACKING_URI"].startswith("http")


def test_gpu_overlay_requests_a_gpu_and_lands_on_gpu_nodes(rendered):
    spec = pod_spec(one(rendered["overlays/gpu"], "Deployment"))
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["runtimeClassName"] == "nvidia"
    assert one(rendered["overlays/gpu"], "ConfigMap")["data"]["DISTILOPS_MAX_BATCH_SIZE"] == "128"


def test_cpu_overlay_requests_no_gpu(rendered):
    spec = pod_spec(one(rendered["overlays/cpu"], "Deployment"))
    assert "nvidia.com/gpu" not in str(spec) and "runtimeClassName" not in spec
    limits = spec["containers"][0]["resources"]["limits"]
    data = one(rendered["overlays/cpu"], "ConfigMap")["data"]
    assert int(data["DISTILOPS_WORKERS"]) * int(data["DISTILOPS_THREADS"]) == int(limits["cpu"])


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_pods_are_locked_down_and_roll_without_downtime(rendered, overlay):
    deployment = one(rendered[overlay], "Deployment")
    spec = pod_spec(deployment)
    container = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    writable = {m["mountPath"] for m in container["volumeMounts"]}
    bentoml_home = next(e["value"] for e in container["env"] if e["name"] == "BENTOML_HOME")
    assert {bentoml_home, "/tmp"} <= writable
    assert {v["name"] for v in spec["volumes"] if "emptyDir" in v} == {m["name"] for m in container["volumeMounts"]}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["replicas"] >= 2
    assert one(rendered[overlay], "PodDisruptionBudget")["spec"]["minAvailable"] >= 1


def test_training_jobs_share_a_study_and_run_on_gpus(rendered):
    docs = rendered["jobs"]
    pipeline, tune = one(docs, "Job", "distilops-pipeline"), one(docs, "Job", "distilops-tune")
    assert "dvc repro" in pod_spec(pipeline)["containers"][0]["args"][0]
    assert tune["spec"]["completionMode"] == "Indexed"
    assert tune["spec"]["parallelism"] == tune["spec"]["completions"] >= 2
    worker = pod_spec(tune)["containers"][0]
    assert worker["command"] == ["distilops", "tune"]
    for job in (pipeline, tune):
        container = pod_spec(job)["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"secretRef": {"name": "distilops-credentials"}} in container["envFrom"]  # the study's database URL
        volumes = pod_spec(job)["volumes"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
        assert claims == {one(docs, "PersistentVolumeClaim")["metadata"]["name"]}
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_worker_command_exists_and_reads_the_index_kubernetes_sets():
    from typer.testing import CliRunner

    from distilops.cli import app

    result = CliRunner().invoke(app, ["tune", "--help"])
    assert result.exit_code == 0
    assert "JOB_COMPLETION_INDEX" in result.output and "DISTILOPS_OPTUNA_STORAGE" in result.output

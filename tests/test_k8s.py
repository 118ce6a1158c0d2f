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
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/cpu", "jobs", "platform")
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
    assert secret["name"] == "distilops-serving" and secret["optional"] is True


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_probes_call_endpoints_the_service_has(rendered, overlay):
    container = pod_spec(one(rendered[overlay], "Deployment"))["containers"][0]
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths <= set(PROBE_PATHS)  # test_service.py checks that the running server answers these
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # ready only once the model is loaded
    assert all(container[p]["httpGet"]["port"] == "http" for p in ("livenessProbe", "readinessProbe"))


def test_config_map_sets_every_setting_the_service_reads(rendered):
    service_code = (ROOT / "src/distilops/serving/service.py").read_text()
    read = set(re.findall(r'os\.environ\.get\("(DISTILOPS_[A-Z_]+)"', service_code))
    # The image fixes the model; logs stay default; the CPU limit comes from the downward API (below).
    read -= {"DISTILOPS_BENTO_MODEL", "DISTILOPS_ACCESS_LOG", "DISTILOPS_CPU_LIMIT"}
    data = one(rendered["base"], "ConfigMap")["data"]
    assert read and read <= set(data), f"not in the ConfigMap: {read - set(data)}"
    assert not any("MLFLOW" in key or "PASSWORD" in key or "STORAGE" in key for key in data)  # serving needs none


def test_gpu_overlay_requests_a_gpu_and_refuses_to_serve_without_cuda(rendered):
    docs = rendered["overlays/gpu"]
    spec = pod_spec(one(docs, "Deployment"))
    container = spec["containers"][0]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["runtimeClassName"] == "nvidia"  # from the optional component
    # The device plugin decides which GPU a pod sees: nothing may override its NVIDIA_VISIBLE_DEVICES.
    assert "NVIDIA_VISIBLE_DEVICES" not in str(container)
    data = one(docs, "ConfigMap")["data"]
    assert data["DISTILOPS_REQUIRE_GPU"] == "1" and data["DISTILOPS_MAX_BATCH_SIZE"] == "128"


def test_runtime_class_is_an_optional_component():
    kustomization = yaml.safe_load((ROOT / "k8s/overlays/gpu/kustomization.yaml").read_text())
    assert kustomization["components"] == ["../../components/nvidia-runtime-class"]
    assert "runtimeClassName" not in (ROOT / "k8s/overlays/gpu/deployment-gpu.yaml").read_text()


def test_gpu_pods_scale_on_requests_in_flight_not_cpu(rendered):
    hpa = one(rendered["overlays/gpu"], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "distilops_requests_in_flight"
    # the adapter rule in the overlay maps it from the gauge the service exports (test_service.py reads it)
    assert "bentoml_service_request_in_progress" in (ROOT / "k8s/overlays/gpu/hpa-in-flight.yaml").read_text()
    assert one(rendered["overlays/cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_cpu_overlay_requests_no_gpu_and_threads_follow_the_cpu_limit(rendered):
    spec = pod_spec(one(rendered["overlays/cpu"], "Deployment"))
    assert "nvidia.com/gpu" not in str(spec) and "runtimeClassName" not in spec
    container = spec["containers"][0]
    data = one(rendered["overlays/cpu"], "ConfigMap")["data"]
    assert data["DISTILOPS_THREADS"] == "0" and data["DISTILOPS_REQUIRE_GPU"] == "0"
    limit = next(e for e in container["env"] if e["name"] == "DISTILOPS_CPU_LIMIT")["valueFrom"]["resourceFieldRef"]
    assert limit == {"containerName": "classifier", "resource": "limits.cpu", "divisor": "1"}


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
    assert "/tmp" in writable and any(bentoml_home.startswith(path + "/") for path in writable)
    assert {v["name"] for v in spec["volumes"] if "emptyDir" in v} == {m["name"] for m in container["volumeMounts"]}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"]  # the HPA owns the count: an apply must not reset it
    assert one(rendered[overlay], "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    assert one(rendered[overlay], "PodDisruptionBudget")["spec"]["minAvailable"] >= 1


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_no_job_credential_reaches_a_serving_pod(rendered, overlay):
    text = yaml.safe_dump_all(rendered[overlay])
    for secret in ("distilops-jobs", "distilops-platform", "distilops-credentials"):
        assert secret not in text
    secrets = [d for d in rendered[overlay] if d["kind"] == "Secret"]
    assert not secrets


def test_training_jobs_share_a_study_and_run_on_gpus(rendered):
    docs = rendered["jobs"]
    pipeline, tune = one(docs, "Job", "distilops-pipeline"), one(docs, "Job", "distilops-tune")
    script = pod_spec(pipeline)["containers"][0]["args"][0]
    assert "dvc repro" in script
    # The code comes from the image on every run (never a stale copy on the reused volume) ...
    assert "rm -rf /workspace/repo/src /workspace/repo/stages" in script and "[ -f dvc.yaml ] ||" not in script
    # ... and the workers wait for this run's teacher outputs: the marker written after them holds the run's key.
    wait = pod_spec(tune)["initContainers"][0]["args"][0]
    key = "RUN_KEY=$(cd /opt/distilops && find . -type f"
    assert key in script and key in wait
    assert script.index("rm -f /workspace/run/teacher_outputs.ready") < script.index("dvc repro teacher_outputs")
    marker = 'echo "$RUN_KEY" > /workspace/run/teacher_outputs.ready'
    assert script.index("dvc repro teacher_outputs") < script.index(marker)
    assert tune["spec"]["completionMode"] == "Indexed"
    assert tune["spec"]["parallelism"] == tune["spec"]["completions"] >= 2
    worker = pod_spec(tune)["containers"][0]
    assert worker["command"] == ["distilops", "tune"]
    for job in (pipeline, tune):
        container = pod_spec(job)["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"secretRef": {"name": "distilops-jobs"}} in container["envFrom"]  # the study's database URL
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

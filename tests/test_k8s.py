"""Kubernetes manifests: every kustomization rendered (`kubectl kustomize`) and validated offline against
the official schemas, strict on unknown fields; then checks that the manifests fit the service they deploy."""

import copy
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from containers import cpus
from serving import PROBE_PATHS

from distilops.errors import DeployError
from distilops.release.deploy import validate

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZATIONS = ("namespace", "base", "overlays/gpu", "overlays/cpu", "overlays/gpu-canary", "overlays/cpu-canary",
                  "jobs", "train", "platform", "monitoring")
APPS = [k for k in KUSTOMIZATIONS if k != "namespace"]  # what users apply and delete, again and again
K8S_VERSIONS = ("1.30.0", "1.33.0")


def render(kustomization: str | Path) -> list[dict]:
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
    """Core kinds against Kubernetes' schemas; custom resources (PodMonitor, PrometheusRule, Rollout,
    AnalysisTemplate) against their vendored CRDs."""
    validate(rendered[kustomization], (version,))


def test_custom_resources_are_checked_against_their_crd(rendered):
    monitor = one(rendered["monitoring"], "PodMonitor")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    endpoint["scrapeInterval"] = "15s"  # a typo of `interval`: the API server would reject or drop it
    with pytest.raises(DeployError, match="PodMonitor/distilops-classifier fails its CRD schema.*scrapeInterval"):
        validate([monitor])
    del endpoint["scrapeInterval"]
    endpoint["interval"] = 15  # a number where the CRD wants a duration string
    with pytest.raises(DeployError, match="fails its CRD schema"):
        validate([monitor])


def test_strict_validation_catches_an_unknown_field(rendered):
    deployment = one(rendered["overlays/cpu"], "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_base_has_every_serving_object(rendered):
    kinds = sorted(d["kind"] for d in rendered["base"])
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "Deployment", "Service",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"])


@pytest.mark.parametrize("app", APPS)
def test_no_app_owns_the_namespace(rendered, app):
    """Deleting or pruning an app must not delete the namespace, and with it the platform's volumes; nor may
    a deploy need cluster-scope rights to relabel it. Only k8s/namespace holds it."""
    assert not [d for d in rendered[app] if d["kind"] == "Namespace"]
    assert {d["metadata"].get("namespace") for d in rendered[app]} == {"distilops"}


def test_the_namespace_enforces_the_restricted_pod_security_standard(rendered):
    namespace = one(rendered["namespace"], "Namespace")
    assert namespace["metadata"]["name"] == "distilops"
    labels = namespace["metadata"]["labels"]
    assert {labels[f"pod-security.kubernetes.io/{mode}"] for mode in ("enforce", "warn", "audit")} == {"restricted"}


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(spec: dict) -> list[str]:
    """The restricted Pod Security Standard's rules (kubernetes.io/docs/concepts/security/pod-security-standards),
    as the admission controller checks them on one pod spec."""
    found = []
    pod_context = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            found.append(flag)
    found += [f"volume {v['name']}" for v in spec.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    if pod_context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        found.append("pod seccompProfile")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        context, name = container.get("securityContext", {}), container["name"]
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


@pytest.mark.parametrize("app", APPS)
def test_every_pod_complies_with_the_restricted_standard(rendered, app):
    workloads = [d for d in rendered[app] if d["kind"] in ("Deployment", "StatefulSet", "Job")]
    for workload in workloads:
        assert not restricted_violations(pod_spec(workload)), workload["metadata"]["name"]


def test_the_restricted_check_sees_a_violation(rendered):
    spec = pod_spec(one(rendered["overlays/cpu"], "Deployment"))
    spec["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"], "drop": ["ALL"]}
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(spec) == ["volume host", "classifier: capabilities"]


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
    from distilops.serving.settings import ALL

    read = {setting.name for setting in ALL}  # what the service reads, declared once
    # The image fixes the model; logs stay default; the CPU limit comes from the downward API (below); the API
    # token from the optional distilops-serving Secret, never a ConfigMap.
    read -= {"DISTILOPS_BENTO_MODEL", "DISTILOPS_ACCESS_LOG", "DISTILOPS_CPU_LIMIT", "DISTILOPS_API_TOKEN"}
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
    assert "nodeSelector" not in spec  # node affinity on GPU feature discovery's labels instead (below)
    assert spec["runtimeClassName"] == "nvidia"  # from the optional component
    # The device plugin decides which GPU a pod sees: nothing may override its NVIDIA_VISIBLE_DEVICES.
    assert "NVIDIA_VISIBLE_DEVICES" not in str(container)
    data = one(docs, "ConfigMap")["data"]
    assert data["DISTILOPS_REQUIRE_GPU"] == "1" and data["DISTILOPS_MAX_BATCH_SIZE"] == "128"


def test_runtime_class_is_an_optional_component():
    kustomization = yaml.safe_load((ROOT / "k8s/overlays/gpu/kustomization.yaml").read_text())
    assert kustomization["components"] == ["../../components/nvidia-runtime-class"]
    assert "runtimeClassName" not in (ROOT / "k8s/overlays/gpu/deployment-gpu.yaml").read_text()


def test_the_pod_monitor_scrapes_the_classifier_metrics(rendered):
    monitor = one(rendered["monitoring"], "PodMonitor")
    deployment = one(rendered["overlays/cpu"], "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in pod_spec(deployment)["containers"][0]["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations.get("prometheus.io/path", "/metrics") == endpoint["path"]


def test_cpu_pods_can_scale_on_requests_in_flight_too(tmp_path):
    """The opt-in component adds the in-flight metric beside CPU (the HPA takes the larger count)."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "k8s/overlays/cpu", tmp_path)],  # kustomize refuses absolute paths
        "components": [os.path.relpath(ROOT / "k8s/components/scale-on-in-flight", tmp_path)]}))
    docs = render(tmp_path)
    validate(docs)
    cpu, in_flight = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    assert in_flight["pods"]["metric"]["name"] == "distilops_requests_in_flight"
    assert int(in_flight["pods"]["target"]["averageValue"]) <= int(
        one(docs, "ConfigMap")["data"]["DISTILOPS_MAX_BATCH_SIZE"])


def test_gpu_pods_scale_on_requests_in_flight_not_cpu(rendered):
    hpa = one(rendered["overlays/gpu"], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "distilops_requests_in_flight"
    # the adapter rule in the overlay maps it from the gauge the service exports (test_service.py reads it)
    (rule,) = yaml.safe_load((ROOT / "k8s/monitoring/prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == "distilops_requests_in_flight"
    assert rule["seriesQuery"].startswith("bentoml_service_request_in_progress{")
    assert one(rendered["overlays/cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_cpu_overlay_requests_no_gpu_and_threads_follow_the_cpu_limit(rendered):
    spec = pod_spec(one(rendered["overlays/cpu"], "Deployment"))
    assert "nvidia.com/gpu" not in str(spec) and "runtimeClassName" not in spec
    container = spec["containers"][0]
    data = one(rendered["overlays/cpu"], "ConfigMap")["data"]
    assert data["DISTILOPS_THREADS"] == "0" and data["DISTILOPS_REQUIRE_GPU"] == "0"
    limit = next(e for e in container["env"] if e["name"] == "DISTILOPS_CPU_LIMIT")["valueFrom"]["resourceFieldRef"]
    assert limit == {"containerName": "classifier", "resource": "limits.cpu", "divisor": "1"}


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/cpu-canary", "overlays/gpu", "overlays/gpu-canary"])
def test_the_shadow_fits_the_cpu_quota_and_a_busy_pod_reaches_the_cpu_target(rendered, overlay):
    """A pod's CPU limit is a CFS quota over all its threads: ONNX Runtime's threads (the limit / workers) plus a
    shadow running alongside them overrun it, and the pod is throttled, model included, every period it does
    (benchmarks/shadow_quota.py). With shadowing on, the shadow takes turns with the model, or the limit covers
    both. Requests = limits (Guaranteed QoS: evicted last). A CPU HPA's target must be reachable by a pod whose
    model threads are all busy: a limit with room for a shadow the model cannot use (or fewer model threads than
    the limit, the fix tried before) leaves a saturated pod below it, and the HPA never scales out."""
    from distilops.serving import settings

    docs = rendered[overlay]
    resources = pod_spec(one(docs, "Deployment"))["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"], resources
    limit = cpus(resources["limits"]["cpu"])
    config = one(docs, "ConfigMap")["data"]
    read = settings.read({**config, "DISTILOPS_CPU_LIMIT": str(math.ceil(limit))})  # the downward API rounds up
    per_worker = read.threads or max(1, math.ceil(limit) // read.workers)  # service.threads_per_worker
    model_threads = per_worker * read.workers
    shadow_threads = (read.shadow_threads or per_worker) * read.workers
    if read.shadow_rate > 0 and not read.shadow_serial:
        assert limit >= model_threads + shadow_threads, (
            f"{overlay}: {model_threads} model + {shadow_threads} shadow threads run at once on a {limit}-CPU quota")
    for metric in one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]:
        if metric["type"] == "Resource" and metric["resource"]["name"] == "cpu":
            target = metric["resource"]["target"]["averageUtilization"]
            busy = 100 * min(model_threads, limit) / cpus(resources["requests"]["cpu"])
            assert busy >= target, f"{overlay}: a saturated pod reads {busy:.0f}% of its CPU request < {target}%"


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
    assert strategy["type"] == "RollingUpdate"
    if overlay == "overlays/cpu":  # surge first: never fewer ready pods than desired
        assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    else:  # a full GPU pool has no GPU for a surge pod: replace one at a time, or the rollout stalls
        assert strategy["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
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


def test_workers_start_when_there_is_work_and_only_the_pipeline_may_start_them(rendered):
    """No GPU waits through the teacher phase: the workers' Job is created suspended, and the pipeline starts
    it right after writing the teacher-outputs marker, through a service account that may do only that."""
    docs = rendered["jobs"]
    pipeline, tune = one(docs, "Job", "distilops-pipeline"), one(docs, "Job", "distilops-tune")
    assert tune["spec"]["suspend"] is True and not pipeline["spec"].get("suspend")
    script = pod_spec(pipeline)["containers"][0]["args"][0]
    marker = 'echo "$RUN_KEY" > /workspace/run/teacher_outputs.ready'
    start = "distilops start-workers --job distilops-tune"
    assert script.index(marker) < script.index(start) < script.rindex("dvc repro\n")
    assert pod_spec(pipeline)["serviceAccountName"] == "distilops-pipeline"
    assert pod_spec(pipeline)["automountServiceAccountToken"] is True
    assert pod_spec(tune)["automountServiceAccountToken"] is False and "serviceAccountName" not in pod_spec(tune)
    assert one(docs, "ServiceAccount", "distilops-pipeline")["automountServiceAccountToken"] is False
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "resourceNames": ["distilops-tune"],
                              "verbs": ["get", "patch"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "distilops-pipeline", "namespace": "distilops"}]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_jobs_never_pull_a_moving_tag(rendered):
    """Raw k8s/jobs names a placeholder tag no registry holds; `distilops jobs` pins the digest."""
    for job in (d for d in rendered["jobs"] if d["kind"] == "Job"):
        for container in (*pod_spec(job).get("initContainers", []), *pod_spec(job)["containers"]):
            assert container["image"].endswith(":unpinned-render-with-distilops-jobs"), container["image"]


def test_the_worker_command_exists_and_reads_the_index_kubernetes_sets():
    from typer.testing import CliRunner

    from distilops.cli import app

    result = CliRunner().invoke(app, ["tune", "--help"])
    assert result.exit_code == 0
    assert "JOB_COMPLETION_INDEX" in result.output and "DISTILOPS_OPTUNA_STORAGE" in result.output


def node_matches(term: dict, labels: dict[str, str]) -> bool:
    """One nodeSelectorTerm against a node's labels: its expressions ANDed (Kubernetes' semantics)."""
    def holds(expression: dict) -> bool:
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        if op == "Exists":
            return key in labels
        if op == "DoesNotExist":
            return key not in labels
        if key not in labels:
            return op == "NotIn"
        if op in ("Gt", "Lt"):  # integer comparison; a label that is no integer never matches
            if not labels[key].lstrip("-").isdigit():
                return False
            return int(labels[key]) > int(values[0]) if op == "Gt" else int(labels[key]) < int(values[0])
        return (labels[key] in values) == (op == "In")
    return all(holds(e) for e in term["matchExpressions"])


def schedulable(spec: dict, labels: dict[str, str]) -> bool:
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return any(node_matches(term, labels) for term in terms)  # terms are ORed


def gfd_node(driver: int, compute: str) -> dict[str, str]:
    major, minor = compute.split(".")
    return {"nvidia.com/cuda.driver-version.major": str(driver),  # standalone GFD: no gpu.present
            "nvidia.com/gpu.compute.major": major, "nvidia.com/gpu.compute.minor": minor}


def test_gpu_pods_land_only_where_the_image_can_run(rendered):
    """The GPU image's ONNX Runtime is built on CUDA 13: driver >= 580, compute capability >= 7.5. A pod placed
    elsewhere would start, get no CUDA provider and never become ready. Nodes as GPU feature discovery labels them."""
    spec = pod_spec(one(rendered["overlays/gpu"], "Deployment"))
    for driver, compute in ((580, "7.5"), (580, "8.0"), (590, "9.0"), (580, "12.0")):  # T4, A100, H100, Blackwell
        assert schedulable(spec, gfd_node(driver, compute)), (driver, compute)
    for driver, compute in ((575, "8.0"), (550, "9.0"), (580, "7.0"), (580, "6.1")):  # old driver; V100; P4
        assert not schedulable(spec, gfd_node(driver, compute)), (driver, compute)
    assert not schedulable(spec, {"kubernetes.io/os": "linux"})  # a CPU node, or a GPU node GFD has not labelled


def test_replicas_spread_over_nodes_and_zones(rendered):
    for overlay in ("overlays/cpu", "overlays/gpu"):
        deployment = one(rendered[overlay], "Deployment")
        spec = pod_spec(deployment)
        constraints = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
        assert constraints["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"  # never one node
        assert constraints["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
        for constraint in constraints.values():
            assert constraint["maxSkew"] == 1 and constraint["matchLabelKeys"] == ["pod-template-hash"]
            assert constraint["nodeTaintsPolicy"] == "Honor"  # tainted nodes are no empty domains
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_serving_outranks_training_for_the_cluster(rendered):
    classes = {d["metadata"]["name"]: d for d in rendered["namespace"] if d["kind"] == "PriorityClass"}
    serving, training = classes["distilops-serving"], classes["distilops-training"]
    assert serving["value"] > training["value"] and training["preemptionPolicy"] == "Never"
    assert not serving.get("globalDefault") and not training.get("globalDefault")
    for overlay in ("overlays/cpu", "overlays/gpu"):
        assert pod_spec(one(rendered[overlay], "Deployment"))["priorityClassName"] == "distilops-serving"
    for job in (d for d in rendered["jobs"] if d["kind"] == "Job"):
        assert pod_spec(job)["priorityClassName"] == "distilops-training"


def test_the_grace_period_covers_the_drain(rendered):
    """preStop sleep, then BentoML's graceful shutdown (at least the service's traffic timeout, so no accepted
    request is cut), then a margin: all before the kubelet's SIGKILL."""
    service_code = (ROOT / "src/distilops/serving/service.py").read_text()
    traffic_timeout = int(re.search(r'traffic=\{"timeout": (\d+)', service_code).group(1))
    for overlay in ("overlays/cpu", "overlays/gpu"):
        spec = pod_spec(one(rendered[overlay], "Deployment"))
        container = spec["containers"][0]
        args = container["args"]
        graceful = int(args[args.index("--timeout-graceful-shutdown") + 1])
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert graceful >= traffic_timeout
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + graceful + 5
        assert args[args.index("--port") + 1] == str(container["ports"][0]["containerPort"])


def adapter_query(rule: dict, namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter runs for the HPA: its template filled as the adapter fills it (the
    label matchers name only the resources asked about: namespace and pods)."""
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", rule["seriesQuery"].split("{")[0])
            .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))


def test_the_adapter_rule_keeps_the_classify_filter():
    """seriesQuery only discovers series; the query the HPA's numbers come from must filter /classify itself,
    or in-flight requests of /readyz, /metrics and /model would count."""
    (rule,) = yaml.safe_load((ROOT / "k8s/monitoring/prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    query = adapter_query(rule, "distilops", ["classifier-a", "classifier-b"])
    assert query == ('sum(bentoml_service_request_in_progress{namespace="distilops",pod=~"classifier-a|classifier-b",'
                     'endpoint="/classify"}) by (pod)')


def test_the_adapter_asks_the_prometheus_the_canary_analysis_asks(rendered):
    """The chart's default URL (prometheus.default.svc) names no Prometheus here: the in-flight metric would never
    exist and the GPU HPA never scale on it."""
    values = yaml.safe_load((ROOT / "k8s/monitoring/prometheus-adapter-values.yaml").read_text())
    template = one(rendered["overlays/cpu-canary"], "AnalysisTemplate")
    address = next(a["value"] for a in template["spec"]["args"] if a["name"] == "prometheus-address")
    assert f"{values['prometheus']['url']}:{values['prometheus']['port']}" == address


def test_the_platform_admits_only_its_clients(rendered):
    platform, jobs = rendered["platform"], rendered["jobs"]
    postgres, mlflow = one(platform, "NetworkPolicy", "postgres"), one(platform, "NetworkPolicy", "mlflow")
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in platform + jobs + rendered["overlays/cpu"] if d["kind"] in ("Deployment", "StatefulSet", "Job")}

    def admitted(policy: dict) -> set[str]:
        allowed = set()
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                wanted = peer["podSelector"].get("matchLabels", {})
                allowed |= {name for name, labels in pods.items() if wanted.items() <= labels.items()}
        return allowed

    assert postgres["spec"]["podSelector"]["matchLabels"].items() <= pods["postgres"].items()
    assert admitted(postgres) == {"mlflow", "distilops-pipeline", "distilops-tune"}  # not the serving pods
    assert admitted(mlflow) >= {"distilops-pipeline", "distilops-tune"}
    assert set(postgres["spec"]["policyTypes"]) == set(mlflow["spec"]["policyTypes"]) == {"Ingress", "Egress"}


# --- canary releases (Argo Rollouts) and the metrics they are judged by --------------------------------------

CANARIES = ("overlays/cpu-canary", "overlays/gpu-canary")
# The series the service exports (the shared contract of issue 18) and BentoML's own: nothing else may be queried.
CONTRACT_SERIES = {
    "distilops_predictions_total", "distilops_prediction_confidence_bucket", "distilops_prediction_confidence_count",
    "distilops_prediction_confidence_sum", "distilops_text_words_bucket", "distilops_text_windows_bucket",
    "distilops_shadow_compared_total", "distilops_shadow_agreed_total", "distilops_shadow_dropped_total",
    "distilops_live_agreement", "distilops_drift_psi", "distilops_reference_agreement",
    "distilops_classify_responses_total", "bentoml_service_request_total",
    "bentoml_service_request_duration_seconds_bucket"}
SIMPLE_CONDITION = re.compile(r"^result\[0\] (<=|>=|<|>) -?\d+(\.\d+)?$")


def series_in(query: str) -> set[str]:
    """Metric names a PromQL query selects (every selector here has {labels})."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query))


@pytest.mark.parametrize("overlay", CANARIES)
def test_the_rollout_takes_its_pods_from_the_deployment(rendered, overlay):
    docs = rendered[overlay]
    rollout, deployment = one(docs, "Rollout"), one(docs, "Deployment")
    ref = rollout["spec"]["workloadRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert ref["scaleDown"] == "progressively"  # a live Deployment is scaled down only as the Rollout's pods come up
    assert rollout["spec"]["selector"] == deployment["spec"]["selector"]
    assert "template" not in rollout["spec"] and "replicas" not in rollout["spec"]  # the HPA owns the count
    assert "replicas" not in deployment["spec"]  # Argo scales it to 0; applying again must not scale it back
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
                                             "name": rollout["metadata"]["name"]}
    # same pod template as the plain overlay but for the spread key Argo's pods carry
    plain = one(render(overlay.removesuffix("-canary")), "Deployment")  # fresh: other tests edit `rendered`
    spec = pod_spec(deployment)
    assert {tuple(c["matchLabelKeys"]) for c in spec["topologySpreadConstraints"]} == {("rollouts-pod-template-hash",)}
    for constraint in pod_spec(plain)["topologySpreadConstraints"]:
        constraint["matchLabelKeys"] = ["rollouts-pod-template-hash"]
    assert plain["spec"]["template"] == deployment["spec"]["template"]
    assert {d["metadata"]["namespace"] for d in docs} == {"distilops"}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = one(docs, kind)["spec"]["selector"]
        assert selector.get("matchLabels", selector).items() <= pod_labels.items()


@pytest.mark.parametrize("overlay", CANARIES)
def test_the_canary_steps_are_analysed_throughout(rendered, overlay):
    canary = one(rendered[overlay], "Rollout")["spec"]["strategy"]["canary"]
    weights = [s["setWeight"] for s in canary["steps"] if "setWeight" in s]
    assert weights == sorted(weights) and weights[0] <= 10 and all(w < 100 for w in weights)
    assert all(s.get("pause", {}).get("duration") for s in canary["steps"] if "pause" in s)  # never waits for a human
    analysis = canary["analysis"]
    assert analysis["templates"] == [{"templateName": "distilops-canary"}] and "startingStep" not in analysis
    surge = (canary["maxSurge"], canary["maxUnavailable"])
    assert surge == ((1, 0) if overlay == "overlays/cpu-canary" else (0, 1))  # as each overlay's rolling update


@pytest.mark.parametrize("overlay", CANARIES)
def test_the_rollout_passes_every_arg_the_analysis_needs(rendered, overlay):
    docs = rendered[overlay]
    template = one(docs, "AnalysisTemplate", "distilops-canary")
    passed = {a["name"]: a for a in one(docs, "Rollout")["spec"]["strategy"]["canary"]["analysis"]["args"]}
    declared = {a["name"]: a for a in template["spec"]["args"]}
    assert set(passed) <= set(declared)
    assert {name for name, arg in declared.items() if "value" not in arg} == set(passed)
    assert passed["canary-hash"]["valueFrom"] == {"podTemplateHashValue": "Latest"}
    assert passed["stable-hash"]["valueFrom"] == {"podTemplateHashValue": "Stable"}
    assert passed["namespace"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert declared["prometheus-address"]["value"].startswith("http://")
    used = set(re.findall(r"\{\{args\.([a-z-]+)\}\}", yaml.safe_dump(template["spec"]["metrics"], width=10**6)))
    assert used == set(declared)


def test_every_analysis_metric_reads_contract_series_and_has_three_outcomes(rendered):
    """Each metric: contract series of the canary's revision; a success and a failure condition, so that the
    NaN a query returns for too little data is neither (Inconclusive: Argo pauses after inconclusiveLimit),
    never a pass; the first measurement after the pods were scraped (initialDelay); aborted within minutes."""
    template = one(rendered["overlays/cpu-canary"], "AnalysisTemplate")
    metrics = {m["name"]: m for m in template["spec"]["metrics"]}
    assert set(metrics) == {"scraped", "error-ratio", "latency-p95-ratio", "agreement-vs-stable",
                            "agreement-vs-evaluated", "label-mix-shift"}
    for name, metric in metrics.items():
        query = metric["provider"]["prometheus"]["query"]
        assert series_in(query) and series_in(query) <= CONTRACT_SERIES | {"up"}, (name, series_in(query))
        assert "{{args.canary-hash}}" in query and 'namespace="{{args.namespace}}"' in query
        for selector in re.findall(r"\{([^{}]*(?:\{\{[^}]*\}\}[^{}]*)*)\}\[?", query):
            if "rollouts_pod_template_hash" not in selector and "args." in selector:
                raise AssertionError(f"{name}: a selector without the revision: {selector}")
        assert SIMPLE_CONDITION.match(metric["successCondition"]), metric["successCondition"]
        assert SIMPLE_CONDITION.match(metric["failureCondition"]), metric["failureCondition"]
        fallback = "or on() vector(0)" if name == "scraped" else "or on() vector(0/0)"  # not scraped fails
        assert query.rstrip().endswith(fallback), name
        assert metric["interval"] == "1m" and int(metric["failureLimit"]) <= 2  # aborted within minutes
        assert metric["initialDelay"] == "1m" and int(metric["consecutiveErrorLimit"]) <= 2
    # A canary failing every request answers no text: the text metrics stay NaN, and must outlast the error
    # ratio's verdict (its inconclusive allowance, then failureLimit + 1 failures), or the run ends Inconclusive
    # (a pause) instead of aborting. Seen on the real controller (tests/test_canary_release.py).
    errors = metrics["error-ratio"]
    for name in ("agreement-vs-stable", "agreement-vs-evaluated", "label-mix-shift"):
        assert int(metrics[name]["inconclusiveLimit"]) > int(errors["inconclusiveLimit"]) + int(errors["failureLimit"])


@pytest.mark.parametrize("overlay", CANARIES)
def test_agreement_with_the_evaluated_interval_informs_and_never_judges(rendered, overlay):
    """The evaluated interval comes from the test split, not live traffic (general English agrees less): as a
    gate it would abort good canaries, so the Rollout runs it as a dry run."""
    analysis = one(rendered[overlay], "Rollout")["spec"]["strategy"]["canary"]["analysis"]
    assert analysis["dryRun"] == [{"metricName": "agreement-vs-evaluated"}]


def test_the_canary_crds_refuse_a_typo(rendered):
    docs = copy.deepcopy(rendered["overlays/cpu-canary"])
    rollout, template = one(docs, "Rollout"), one(docs, "AnalysisTemplate")
    rollout["spec"]["workloadRef"]["scaledown"] = rollout["spec"]["workloadRef"].pop("scaleDown")
    with pytest.raises(DeployError, match="Rollout/distilops-classifier fails its CRD schema.*scaledown"):
        validate([rollout])
    template["spec"]["metrics"][0]["sucessCondition"] = template["spec"]["metrics"][0].pop("successCondition")
    with pytest.raises(DeployError, match="AnalysisTemplate/distilops-canary fails its CRD schema.*sucessCondition"):
        validate([template])
    rule = copy.deepcopy(one(rendered["monitoring"], "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][-1]["for_"] = "15m"
    with pytest.raises(DeployError, match="PrometheusRule/distilops-fidelity fails its CRD schema.*for_"):
        validate([rule])


def test_series_carry_the_revision_they_come_from(rendered):
    """The PodMonitor copies Argo's pod label onto every series (as rollouts_pod_template_hash), which the
    analysis selects canary and stable by."""
    monitor = one(rendered["monitoring"], "PodMonitor")
    assert monitor["spec"]["podTargetLabels"] == ["rollouts-pod-template-hash"]


def test_the_rules_read_contract_series_and_their_own_records(rendered):
    rules = [r for g in one(rendered["monitoring"], "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    records = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        assert series_in(rule["expr"]) <= CONTRACT_SERIES | records, rule.get("record") or rule.get("alert")
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert set(alerts) == {"DistilopsLiveAgreementBelowEvaluated", "DistilopsInputDrift", "DistilopsShadowDropping"}
    for alert in alerts.values():
        assert alert["for"] and " >= " in alert["expr"]  # held a while, and a minimum of samples
        assert {"summary", "description", "runbook"} <= set(alert["annotations"])
    assert 'distilops_reference_agreement{bound="low"}' in str(rules)  # the threshold comes from the version

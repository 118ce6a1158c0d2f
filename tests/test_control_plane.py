"""The manifests on a real control plane (tests/cluster: upstream's kube-apiserver, controller-manager and
scheduler at pinned versions, kwok's simulated nodes labelled as real clusters label them).

What the API server admits (server-side apply, Pod Security `restricted`, RBAC), what the Deployment, ReplicaSet,
HPA and Job controllers do with it, and where the scheduler puts the pods (GPU affinity, spread with tainted
nodes, priority and preemption) are upstream's own decisions here; only the containers do not run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from releases import GATES, NAME, make_releases

from distilops.errors import DeployError
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.release import cluster
from distilops.release.deploy import LABEL, kustomize, render, render_jobs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "distilops"
APP = "distilops-classifier"
PIPELINE_IMAGE = "registry.example.com/ml/distilops-pipeline@sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def api(control_plane):
    """An admin client of the test cluster, with the distilops namespace (k8s/namespace) applied."""
    api_client = k8s_config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    cluster.apply(kustomize(ROOT / "k8s" / "namespace"), client=api_client)
    control_plane.empty_namespace(NAMESPACE)  # whatever another module left
    return api_client


@pytest.fixture()
def kubeconfig(control_plane, monkeypatch):
    """KUBECONFIG pointing at the test cluster, for code that finds the cluster as kubectl does."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    return control_plane.kubeconfig


@pytest.fixture()
def clean(control_plane, api):
    """Each test leaves an empty distilops namespace behind (its workloads deleted, their pods gone)."""
    yield
    control_plane.empty_namespace(NAMESPACE)


def wait_until(what: str, done: Callable[[], object], timeout_s: float = 90, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = done()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(poll_s)


def pods(api, selector: str = f"app.kubernetes.io/name={APP}") -> list:
    return k8s.CoreV1Api(api).list_namespaced_pod(NAMESPACE, label_selector=selector).items


def running_pods(api, selector: str = f"app.kubernetes.io/name={APP}") -> list:
    return [p for p in pods(api, selector) if p.status.phase == "Running" and not p.metadata.deletion_timestamp]


def scale(api, name: str, replicas: int) -> None:
    k8s.AppsV1Api(api).patch_namespaced_deployment_scale(name, NAMESPACE, {"spec": {"replicas": replicas}})


def without_hpa(documents: list[dict]) -> list[dict]:
    """The documents less the HorizontalPodAutoscaler, for tests that set the replica count themselves (no
    metrics API runs here: the HPA holds its minimum)."""
    return [d for d in documents if d["kind"] != "HorizontalPodAutoscaler"]


# --- admission ---------------------------------------------------------------------------------------------

def compliant_pod(name: str, **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1034, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "registry.example.com/x@sha256:" + "0" * 64, "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}], **spec}}


def test_pod_security_restricted_is_enforced_in_the_namespace(api, clean):
    """k8s/namespace's labels make the real PodSecurity admission plugin refuse a pod the standard forbids."""
    core = k8s.CoreV1Api(api)
    core.create_namespaced_pod(NAMESPACE, compliant_pod("compliant"))
    root = compliant_pod("as-root")
    root["spec"]["securityContext"] = {}
    root["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(NAMESPACE, root)
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "privileged" in message and "runAsNonRoot" in message


def test_apply_is_server_side_as_distilops_and_wins_conflicts(api, clean):
    """The rendered overlay is the source of truth: a field someone changed by hand is taken back (force)."""
    core = k8s.CoreV1Api(api)
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "apply-test", "namespace": NAMESPACE},
              "data": {"A": "1"}}
    assert cluster.apply([config], client=api) == ["ConfigMap/apply-test"]
    managed = core.read_namespaced_config_map("apply-test", NAMESPACE).metadata.managed_fields
    assert [(m.manager, m.operation) for m in managed] == [("distilops", "Apply")]
    core.patch_namespaced_config_map("apply-test", NAMESPACE, {"data": {"A": "by hand"}}, field_manager="someone")
    cluster.apply([config], client=api)  # a conflict on data.A without force
    assert core.read_namespaced_config_map("apply-test", NAMESPACE).data == {"A": "1"}
    core.delete_namespaced_config_map("apply-test", NAMESPACE)


def test_refusals_are_one_line_with_the_server_reason(api):
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "r", "namespace": NAMESPACE}}
    with pytest.raises(DeployError, match="the cluster does not know example.com/v1 Widget"):
        cluster.apply([widget], client=api)
    with pytest.raises(DeployError, match='starting job distilops/missing: 404 jobs.batch "missing" not found'):
        cluster.start_job(NAMESPACE, "missing", client=api)


# --- rolling releases: `distilops deploy --apply` -------------------------------------------------------------

@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Two releases (tests/releases.py), release 1 promoted; a test that promotes another puts it back."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield make_releases(tmp_path_factory.mktemp("releases"), monkeypatch)


def served_versions(api) -> set[str]:
    return {p.metadata.labels[LABEL] for p in running_pods(api)}


@pytest.fixture()
def served(api, releases, tmp_path):
    """Each CPU release's pods answered by a real `bentoml serve` at the pod's address (tests/cluster/pods.py),
    reachable by `kubectl port-forward` through the API server and kwok's kubelet API; the CLI's params.yaml."""
    from canary_models import bento_model
    from cluster.pods import PodModel, PodServers
    from tiny import make_tiny_model

    from distilops.pipeline.quantize import build

    raw = make_tiny_model(tmp_path / "raw", layers=2, seed=1)
    folder = build("onnx_fp32", save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)),
                                                  tmp_path / "pt", max_length=16, teacher="tiny"), tmp_path / "onnx")
    store = tmp_path / "bentoml"
    models = {r["cpu"]: PodModel(bento_model(folder, folder, f"{NAME}:v{r['cpu']}", r["cpu"], store), store)
              for r in releases}
    servers = PodServers(api, NAMESPACE, models, tmp_path / "pods", env={"DISTILOPS_SHADOW_RATE": "0"}).start()
    params = tmp_path / "params.yaml"
    params.write_text(f"model_name: {NAME}\npromote: {{max_latency_p95_ms: {GATES.max_latency_p95_ms}}}\n")
    yield params
    servers.stop()


def cli(*args: str) -> str:
    """A `distilops` command as a user types it; its output (stderr included), failing loudly."""
    from typer.testing import CliRunner

    from distilops.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_deploy_apply_rolls_out_through_the_real_controllers(api, kubeconfig, releases, served, clean):
    """`distilops deploy --overlay cpu --apply` from the promoted version: server-side apply accepted, the
    Deployment, ReplicaSet and HPA controllers make the pods (the HPA's minimum, 2), Pod Security admits them,
    the scheduler spreads them over CPU nodes, the rollout is followed to completion, and /model answers the
    promoted version through the Service (kubectl port-forward). A second version rolls; after `distilops
    promote --rollback` the first rolls back."""
    first, second = releases
    deploy = ("deploy", "--overlay", "cpu", "--apply", "--skip-registry-check", "--timeout", "300",
              "--params", str(served))
    said = cli(*deploy)
    assert f"the Service answers as {NAME} v{first['cpu']}" in said
    wait_until("the HPA's minimum of 2 replicas", lambda: len(running_pods(api)) == 2)
    placed = {p.spec.node_name for p in running_pods(api)}
    assert len(placed) == 2 and placed <= {"cpu-a1", "cpu-a2", "cpu-b1"}  # one per node; never GPU or control plane
    assert {p.status.qos_class for p in running_pods(api)} == {"Guaranteed"}  # evicted last under node pressure
    applied = {(o.kind, o.metadata.name) for o in (
        k8s.AppsV1Api(api).read_namespaced_deployment(APP, NAMESPACE), k8s.CoreV1Api(api).read_namespaced_service(
            APP, NAMESPACE), k8s.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler(APP, NAMESPACE),
        k8s.PolicyV1Api(api).read_namespaced_pod_disruption_budget(APP, NAMESPACE))}
    assert len(applied) == 4

    cli("promote", second["cpu"], "--params", str(served))
    assert f"the Service answers as {NAME} v{second['cpu']}" in cli(*deploy)
    wait_until("only the second version's pods", lambda: served_versions(api) == {second["cpu"]}, timeout_s=60)

    cli("promote", "--rollback", "--params", str(served))
    assert f"the Service answers as {NAME} v{first['cpu']}" in cli(*deploy)
    wait_until("the first version's pods again", lambda: served_versions(api) == {first["cpu"]}, timeout_s=60)
    history = k8s.AppsV1Api(api).list_namespaced_replica_set(NAMESPACE, label_selector=f"app.kubernetes.io/name={APP}")
    assert len(history.items) == 2  # the rollback reused the first ReplicaSet: the same pod template


def test_applying_before_the_namespace_exists_names_the_fix(control_plane, kubeconfig, releases):
    api_client = k8s_config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    documents = render(NAME, overlay="cpu", check_registry=False).documents
    for doc in documents:
        doc["metadata"]["namespace"] = "not-created"
    with pytest.raises(DeployError, match="namespace not-created does not exist: apply k8s/namespace first"):
        cluster.apply(documents, client=api_client)


# --- scheduling: GPU nodes, spread, priority -------------------------------------------------------------

@pytest.fixture()
def nvidia_runtime_class(api):
    """The RuntimeClass the GPU Operator installs (k8s/components/nvidia-runtime-class names it)."""
    node = k8s.NodeV1Api(api)
    with contextlib.suppress(ApiException):
        node.create_runtime_class({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                   "metadata": {"name": "nvidia"}, "handler": "nvidia"})


ELIGIBLE_GPU_NODES = {"gpu-t4", "gpu-a100", "gpu-h100-gfd"}  # tests/cluster/nodes.yaml


def test_gpu_pods_land_only_on_nodes_meeting_the_affinity(api, releases, nvidia_runtime_class, clean):
    """Four replicas fill the four GPUs of the eligible nodes (a T4 and an A100 with the GPU Operator's labels,
    an H100 labelled by standalone GFD, which sets no gpu.present); the V100 (compute 7.0) and the A10 on
    driver 535 get none; a fifth replica stays Pending for want of a GPU."""
    documents = without_hpa(render(NAME, overlay="gpu", check_registry=False).documents)
    cluster.apply(documents, client=api)
    scale(api, APP, 4)
    wait_until("4 GPU pods running", lambda: len(running_pods(api)) == 4)
    placed = sorted(p.spec.node_name for p in running_pods(api))
    assert placed == ["gpu-a100", "gpu-a100", "gpu-h100-gfd", "gpu-t4"]
    assert {p.status.qos_class for p in running_pods(api)} == {"Guaranteed"}
    scale(api, APP, 5)
    pending = wait_until("a fifth pod refused by the scheduler", lambda: [
        p for p in pods(api) if p.status.phase == "Pending" and any(
            c.type == "PodScheduled" and c.reason == "Unschedulable" for c in p.status.conditions or [])])
    message = next(c.message for c in pending[0].status.conditions if c.type == "PodScheduled")
    assert "Insufficient nvidia.com/gpu" in message and "didn't match Pod's node affinity" in message


def test_spread_ignores_tainted_nodes_so_replicas_scale_past_one_per_node(api, releases, clean):
    """Hostname spread (maxSkew 1, DoNotSchedule) counts only nodes the pods may use: with the tainted GPU and
    control-plane nodes counted as empty domains, no CPU node could take a second pod and scale-ups would
    stay Pending."""
    cluster.apply(without_hpa(render(NAME, overlay="cpu", check_registry=False).documents), client=api)
    scale(api, APP, 6)
    wait_until("6 pods running on the 3 CPU nodes", lambda: len(running_pods(api)) == 6)
    per_node = sorted({n: [p.spec.node_name for p in running_pods(api)].count(n)
                       for n in {p.spec.node_name for p in running_pods(api)}}.items())
    assert per_node == [("cpu-a1", 2), ("cpu-a2", 2), ("cpu-b1", 2)]


def training_pod(name: str, cpu: str) -> dict:
    pod = compliant_pod(name, priorityClassName="distilops-training")
    pod["metadata"]["labels"] = {"app.kubernetes.io/component": "training", "test": "filler"}
    pod["spec"]["containers"][0]["resources"] = {"requests": {"cpu": cpu}}
    return pod


def test_serving_preempts_training_and_training_never_preempts(api, releases, clean):
    """k8s/namespace's priority classes through the real scheduler: CPU nodes full of training pods make room
    for a serving pod (a victim is evicted); serving pods filling the nodes leave a training pod Pending."""
    core = k8s.CoreV1Api(api)
    for i in range(3):  # 7 of each CPU node's 8 cores
        core.create_namespaced_pod(NAMESPACE, training_pod(f"train-{i}", "7"))
    wait_until("3 training pods running", lambda: len(running_pods(api, "test=filler")) == 3)
    cluster.apply(without_hpa(render(NAME, overlay="cpu", check_registry=False).documents), client=api)
    scale(api, APP, 2)  # each asks for 1 core: with 1 free per node, the second on a node needs a victim
    wait_until("2 serving pods running", lambda: len(running_pods(api)) == 2)
    scale(api, APP, 3)
    wait_until("a training pod preempted for the third serving pod", lambda: len(running_pods(api)) == 3
               and len(running_pods(api, "test=filler")) < 3, timeout_s=120)

    scale(api, APP, 0)
    wait_until("serving pods gone", lambda: not pods(api))
    for pod in pods(api, "test=filler"):
        core.delete_namespaced_pod(pod.metadata.name, NAMESPACE, grace_period_seconds=0)
    wait_until("training pods gone", lambda: not pods(api, "test=filler"))
    scale(api, APP, 6)  # 2 per CPU node: no node has 7 cores free
    wait_until("6 serving pods running", lambda: len(running_pods(api)) == 6)
    core.create_namespaced_pod(NAMESPACE, training_pod("late-train", "7"))
    time.sleep(5)  # a scheduling cycle or several: nothing may be preempted for it
    late = core.read_namespaced_pod("late-train", NAMESPACE)
    assert late.status.phase == "Pending" and not late.status.nominated_node_name
    assert len(running_pods(api)) == 6


# --- Jobs: `distilops jobs --apply`, and the pipeline's identity -------------------------------------------

def service_account_client(control_plane, api, name: str):
    """A client holding a token the API server issued to the service account (TokenRequest), as its pod has."""
    token = k8s.CoreV1Api(api).create_namespaced_service_account_token(
        name, NAMESPACE, {"spec": {"expirationSeconds": 600}}).status.token
    configuration = k8s.Configuration()
    configuration.host = control_plane.server
    configuration.ssl_ca_cert = str(control_plane.pki / "ca.crt")
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return k8s.ApiClient(configuration)


def test_the_pipeline_identity_starts_the_tune_job_and_nothing_else(control_plane, api, clean):
    applied = cluster.apply(render_jobs(PIPELINE_IMAGE, check_registry=False), client=api)
    assert {"Job/distilops-pipeline", "Job/distilops-tune", "Role/distilops-start-workers"} <= set(applied)
    batch = k8s.BatchV1Api(api)
    assert batch.read_namespaced_job("distilops-tune", NAMESPACE).spec.suspend is True
    time.sleep(2)  # the Job controller would have made its pods by now, were it not suspended
    assert not pods(api, "app.kubernetes.io/name=distilops-tune")

    pipeline = service_account_client(control_plane, api, "distilops-pipeline")
    assert cluster.start_job(NAMESPACE, "distilops-tune", client=pipeline) is True
    assert batch.read_namespaced_job("distilops-tune", NAMESPACE).spec.suspend is False
    wait_until("the tune workers' pods", lambda: pods(api, "app.kubernetes.io/name=distilops-tune"))
    assert cluster.start_job(NAMESPACE, "distilops-tune", client=pipeline) is False  # already running
    with pytest.raises(DeployError, match='403 .*"system:serviceaccount:distilops:distilops-pipeline" cannot get '
                                          'resource "jobs"'):
        cluster.start_job(NAMESPACE, "distilops-pipeline", client=pipeline)


# --- the platform: MLflow and PostgreSQL ------------------------------------------------------------------

def test_the_platform_objects_are_accepted(api, clean):
    """MLflow (a Deployment on a claim) and PostgreSQL (a StatefulSet with a claim template): accepted, their
    claims bound by the real volume controller to volumes an administrator made, their pods admitted."""
    core = k8s.CoreV1Api(api)
    for i in range(2):
        with contextlib.suppress(ApiException):  # already there from an earlier run of this test
            core.create_persistent_volume({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {
                "name": f"platform-{i}"}, "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce"],
                                                   "hostPath": {"path": f"/srv/platform-{i}"}}})
    documents = kustomize(ROOT / "k8s" / "platform")
    applied = cluster.apply(documents, client=api)
    kinds = {a.split("/")[0] for a in applied}
    assert {"StatefulSet", "Deployment", "Service", "NetworkPolicy"} <= kinds, applied
    wait_until("the MLflow and PostgreSQL pods admitted and running", lambda: len([
        p for p in k8s.CoreV1Api(api).list_namespaced_pod(NAMESPACE).items if p.status.phase == "Running"]) >= 2,
        timeout_s=120)
    for doc in documents:
        if doc["kind"] == "StatefulSet":
            k8s.AppsV1Api(api).delete_namespaced_stateful_set(doc["metadata"]["name"], NAMESPACE)


def test_nodes_carry_the_labels_real_clusters_give_them(api):
    nodes = {n.metadata.name: n for n in k8s.CoreV1Api(api).list_node().items}
    declared = [d["metadata"]["name"] for d in yaml.safe_load_all((ROOT / "tests/cluster/nodes.yaml").read_text()) if d]
    assert sorted(nodes) == sorted(declared)
    assert "nvidia.com/gpu.present" not in nodes["gpu-h100-gfd"].metadata.labels
    assert nodes["gpu-t4"].status.allocatable["nvidia.com/gpu"] == "1"
    assert all(c.status == "True" for n in nodes.values() for c in n.status.conditions if c.type == "Ready")

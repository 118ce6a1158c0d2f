"""k8s/train, the teacher trained across nodes, on the real control plane (tests/cluster): rendered from params as
`distilops jobs --training` renders it, accepted by the API server (server-side apply: its validation and
admission, Pod Security `restricted` included), and given by upstream's Job controller, EndpointSlice controller
and scheduler what torchrun's rendezvous needs: a completion index per pod, a stable DNS name for pod 0 behind the
headless Service, and the GPUs per node params.yaml asks. kwok's pods run no process.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from distilops.config import Distributed
from distilops.release import cluster
from distilops.release.deploy import GPU, TRAIN_JOB, kustomize, render_jobs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "distilops"
IMAGE = "registry.example.com/ml/distilops-pipeline@sha256:" + "cd" * 32
INDEX = "batch.kubernetes.io/job-completion-index"


def wait_until(what: str, done, timeout_s: float = 90, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return value


@pytest.fixture()
def api(control_plane):
    api_client = k8s_config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    cluster.apply(kustomize(ROOT / "k8s" / "namespace"), client=api_client)
    # the RuntimeClass the GPU Operator installs, which the pods name (test_control_plane.py makes it too)
    runtime_class = {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "nvidia"},
                     "handler": "nvidia"}
    with contextlib.suppress(ApiException):
        k8s.NodeV1Api(api_client).create_runtime_class(runtime_class)
    # the ReadWriteMany workspace k8s/jobs claims, on a volume an administrator made for it
    volume = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "train-workspace"}, "spec": {
        "capacity": {"storage": "50Gi"}, "accessModes": ["ReadWriteMany"], "hostPath": {"path": "/srv/workspace"},
        "claimRef": {"namespace": NAMESPACE, "name": "distilops-workspace"}}}
    with contextlib.suppress(ApiException):  # already there from an earlier test
        k8s.CoreV1Api(api_client).create_persistent_volume(volume)
    cluster.apply([d for d in kustomize(ROOT / "k8s" / "jobs") if d["kind"] == "PersistentVolumeClaim"],
                  client=api_client)
    control_plane.empty_namespace(NAMESPACE)
    yield api_client
    control_plane.empty_namespace(NAMESPACE)


def test_the_training_job_gives_each_pod_its_rank_the_rendezvous_and_its_gpus(api):
    documents = render_jobs(IMAGE, check_registry=False, folder="train", training=Distributed(processes=2, nodes=2))
    applied = cluster.apply(documents, client=api)
    assert {f"Job/{TRAIN_JOB}", f"Service/{TRAIN_JOB}", "NetworkPolicy/distilops-train-peers"} <= set(applied)
    core = k8s.CoreV1Api(api)
    assert core.read_namespaced_service(TRAIN_JOB, NAMESPACE).spec.cluster_ip == "None"  # headless: one name a pod

    selector = f"app.kubernetes.io/name={TRAIN_JOB}"
    pods = wait_until("one pod per node", lambda: (found := core.list_namespaced_pod(
        NAMESPACE, label_selector=selector).items) and len(found) == 2 and found)
    by_index = {int(p.metadata.annotations[INDEX]): p for p in pods}
    assert sorted(by_index) == [0, 1]  # the Job controller's completion indexes: torchrun's nodes
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    assert config["DISTILOPS_RENDEZVOUS"] == f"{TRAIN_JOB}-0.{TRAIN_JOB}:29400"
    for index, pod in by_index.items():
        # hostname and subdomain make pod 0 `distilops-train-0.distilops-train`, the rendezvous address
        assert (pod.spec.hostname, pod.spec.subdomain) == (f"{TRAIN_JOB}-{index}", TRAIN_JOB)
        (container,) = pod.spec.containers
        env = {e.name: e for e in container.env}
        assert env["JOB_COMPLETION_INDEX"].value_from.field_ref.field_path.endswith(f"['{INDEX}']")  # the index
        assert {e.config_map_ref.name for e in container.env_from if e.config_map_ref} == {
            next(d for d in documents if d["kind"] == "ConfigMap")["metadata"]["name"]}
        assert container.resources.requests[GPU] == container.resources.limits[GPU] == "2"  # processes per node

    # The scheduler honours the GPUs: of the GPU nodes only gpu-a100 has 2, so both pods go there (kwok ends a Job's
    # pod at once, freeing its GPUs for the next), and the Job controller counts both indexes complete.
    def placed():
        now = [core.read_namespaced_pod(p.metadata.name, NAMESPACE) for p in pods]
        return now if all(p.spec.node_name for p in now) else None

    assert {p.spec.node_name for p in wait_until("both pods placed", placed)} == {"gpu-a100"}
    job = wait_until("the Job complete", lambda: (found := k8s.BatchV1Api(api).read_namespaced_job(
        TRAIN_JOB, NAMESPACE)).status.succeeded == 2 and found)
    assert job.status.completed_indexes == "0,1"


def test_gloo_training_asks_no_gpu_and_seeks_no_gpu_node():
    documents = render_jobs(IMAGE, check_registry=False, folder="train",
                            training=Distributed(processes=4, nodes=3, backend="gloo"))
    job = next(d for d in documents if d["kind"] == "Job")
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert GPU not in pod["containers"][0]["resources"]["requests"]
    assert not {"runtimeClassName", "nodeSelector", "tolerations"} & set(pod)

"""Talking to a cluster through the Kubernetes Python client: server-side apply, rollout waits, Job starts.

Rendering stays with `kubectl kustomize` (deploy.py); what goes to the API server goes through the client, so
answers are objects with fields, not kubectl's text. Credentials: the pod's service account inside a
cluster, else the kubeconfig (KUBECONFIG, ~/.kube/config), as kubectl finds them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distilops import settings
from distilops.errors import DeployError

log = logging.getLogger(__name__)
FIELD_MANAGER = "distilops"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client() -> Any:
    """An ApiClient from the pod's service account, else the kubeconfig; a clear error when neither exists."""
    from kubernetes import client, config

    try:
        if settings.KUBERNETES_SERVICE_HOST.read():
            config.load_incluster_config()
        else:
            # KUBECONFIG read now: the client reads it once, when first imported, and a later change is ignored
            config.load_kube_config(config_file=settings.KUBECONFIG.read() or None)
    except config.ConfigException as exc:
        raise DeployError(f"no cluster credentials: {exc} (inside a pod: a service account token; elsewhere: a "
                          "kubeconfig, as `kubectl` uses)") from None
    return client.ApiClient()


def current_namespace(default: str = "distilops") -> str:
    """The pod's own namespace inside a cluster (its service account says), else `default`."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


def api_error(exc: Exception, what: str) -> DeployError:
    """The API server's own reason (status, message) instead of the client's traceback."""
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None) or str(exc)
    body = getattr(exc, "body", None)
    if body:
        with contextlib.suppress(ValueError, AttributeError):  # not a Status object: keep the reason
            reason = json.loads(body).get("message", reason)
    return DeployError(f"{what}: {status or ''} {reason}".strip())


def missing_namespace(exc: Exception) -> str | None:
    """The namespace a 404 says is missing (the Status's details name it), else None."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        details = json.loads(getattr(exc, "body", None) or "").get("details") or {}
        if details.get("kind") == "namespaces":
            return details.get("name")
    return None


def apply(documents: list[dict], *, dry_run: bool = False, client: Any = None) -> list[str]:
    """Server-side apply of each document, in order, as field manager `distilops` (conflicts forced: the
    rendered overlay is the source of truth). Returns "Kind/name" for each."""
    from kubernetes import dynamic
    from kubernetes.client.exceptions import ApiException

    try:
        dyn = dynamic.DynamicClient(client or api_client())
    except ApiException as exc:
        raise api_error(exc, "asking the cluster which kinds it serves") from None
    applied = []
    for doc in documents:
        kind, name = doc["kind"], doc["metadata"]["name"]
        try:
            resource = dyn.resources.get(api_version=doc["apiVersion"], kind=kind)
            dyn.server_side_apply(resource, body=doc, namespace=doc["metadata"].get("namespace"),
                                  field_manager=FIELD_MANAGER, force_conflicts=True,
                                  **({"dry_run": "All"} if dry_run else {}))
        except ApiException as exc:
            namespace = doc["metadata"].get("namespace")
            if exc.status == 404 and namespace and missing_namespace(exc) == namespace:
                raise DeployError(f"namespace {namespace} does not exist: apply k8s/namespace first (once, with "
                                  "rights over namespaces: `kubectl apply --server-side -k k8s/namespace`)") from None
            raise api_error(exc, f"applying {kind}/{name}") from None
        except dynamic.exceptions.ResourceNotFoundError:
            raise DeployError(f"the cluster does not know {doc['apiVersion']} {kind} (a CRD not installed?)") from None
        applied.append(f"{kind}/{name}")
        log.info("applied %s/%s", kind, name)
    return applied


def rollout_state(deployment: dict) -> tuple[bool, str]:
    """(done, what is happening) for a Deployment's status, as `kubectl rollout status` judges it.
    Raises when the rollout exceeded its progress deadline."""
    spec, status = deployment.get("spec", {}), deployment.get("status") or {}
    metadata = deployment.get("metadata", {})
    if metadata.get("generation", 0) > status.get("observedGeneration", 0):
        return False, "waiting for the Deployment spec update to be observed"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise DeployError(f"rollout of {metadata.get('name')} exceeded its progress deadline: "
                              f"{condition.get('message', '')}")
    wanted = spec.get("replicas", 1)
    updated, replicas = status.get("updatedReplicas", 0), status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < wanted:
        return False, f"{updated} of {wanted} new replicas updated"
    if replicas > updated:
        return False, f"{replicas - updated} old replicas pending termination"
    if available < updated:
        return False, f"{available} of {updated} updated replicas available"
    return True, f"{updated} replicas up to date and available"


def wait_rollout(namespace: str, name: str, *, timeout_s: float = 600, poll_s: float = 2,
                 read: Callable[[], dict] | None = None) -> str:
    """Wait until the Deployment's rollout is complete (rollout_state); DeployError on timeout or deadline."""
    if read is None:
        from kubernetes import client as k8s

        apps = k8s.AppsV1Api(api_client())

        def read() -> dict:
            return apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment_status(name, namespace))

    deadline, message = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        done, now = rollout_state(read())
        if now != message:
            log.info("rollout of %s: %s", name, now)
            message = now
        if done:
            return message
        time.sleep(poll_s)
    raise DeployError(f"rollout of {namespace}/{name} not complete after {timeout_s:.0f} s: {message}")


def start_job(namespace: str, name: str, *, client: Any = None) -> bool:
    """Un-suspend a Job (its pods start now). False if it was already running; DeployError if it is missing."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    batch = k8s.BatchV1Api(client or api_client())
    try:
        job = batch.read_namespaced_job(name, namespace)
        if not job.spec.suspend:
            return False
        batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": False}}, field_manager=FIELD_MANAGER)
    except ApiException as exc:
        raise api_error(exc, f"starting job {namespace}/{name}") from None
    return True


# --- Argo Rollouts: reading a canary's progress (argoproj.io/v1alpha1 rollouts) ----------------------------

ROLLOUTS = ("argoproj.io", "v1alpha1", "rollouts")
POD_HASH = "rollouts-pod-template-hash"  # Argo's label on each revision's ReplicaSet and pods
WORKLOAD_GENERATION = "rollout.argoproj.io/workload-generation"  # the referenced Deployment's generation Argo saw


def not_found(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


def read_rollout(namespace: str, name: str, *, client: Any = None) -> dict | None:
    """The Rollout as a dict (status included); None if there is none, or the cluster has no Rollout kind."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    try:
        return k8s.CustomObjectsApi(client or api_client()).get_namespaced_custom_object(
            *ROLLOUTS[:2], namespace, ROLLOUTS[2], name)
    except ApiException as exc:
        if not_found(exc):
            return None
        raise api_error(exc, f"reading rollout {namespace}/{name}") from None


def read_deployment(namespace: str, name: str, *, client: Any = None) -> dict | None:
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    apps = k8s.AppsV1Api(client or api_client())
    try:
        return apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment(name, namespace))
    except ApiException as exc:
        if not_found(exc):
            return None
        raise api_error(exc, f"reading deployment {namespace}/{name}") from None


def stable_template(namespace: str, name: str, *, client: Any = None) -> dict | None:
    """The pod template metadata (labels, annotations) of what the cluster serves now, before a release:
    the Rollout's stable ReplicaSet (status.stableRS names its rollouts-pod-template-hash) where a Rollout
    exists, else the Deployment's template where its pods are available (a Deployment about to be migrated);
    None where neither serves (a first release). The Deployment's template is not the stable under a Rollout:
    after an aborted canary it still holds the canary's template."""
    client = client or api_client()
    rollout = read_rollout(namespace, name, client=client)
    if rollout is not None:
        template = stable_revision_template(namespace, rollout, client=client)
        return None if template is None else template.get("metadata") or {}
    deployment = read_deployment(namespace, name, client=client)
    if deployment is None or not (deployment.get("status") or {}).get("availableReplicas"):
        return None
    return deployment["spec"]["template"].get("metadata") or {}


def stable_revision_template(namespace: str, rollout: dict, *, client: Any) -> dict | None:
    """The pod template (metadata and spec) of the Rollout's stable ReplicaSet (status.stableRS names its
    rollouts-pod-template-hash); None where there is none yet."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    stable = (rollout.get("status") or {}).get("stableRS")
    if not stable:
        return None
    apps = k8s.AppsV1Api(client)
    try:
        found = apps.list_namespaced_replica_set(namespace, label_selector=f"{POD_HASH}={stable}").items
    except ApiException as exc:
        name = (rollout.get("metadata") or {}).get("name", "")
        raise api_error(exc, f"listing the replica sets of rollout {namespace}/{name}") from None
    return apps.api_client.sanitize_for_serialization(found[0])["spec"]["template"] if found else None


def restore_stable_template(namespace: str, rollout_name: str, workload: str, *, client: Any = None) -> bool:
    """Put the Rollout's stable revision's pod template back on the Deployment it takes its template from
    (workloadRef), after an aborted canary. Argo leaves the Rollout Degraded on the bad template, and a retry
    would run the bad canary again; with the stable template back, the Rollout is Healthy on the stable pods.
    False where there is no stable revision to restore (a first release)."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    client = client or api_client()
    template = stable_revision_template(namespace, read_rollout(namespace, rollout_name, client=client) or {},
                                        client=client)
    if template is None:
        return False
    template.get("metadata", {}).get("labels", {}).pop(POD_HASH, None)  # Argo's, added to its ReplicaSets
    try:
        k8s.AppsV1Api(client).patch_namespaced_deployment(
            workload, namespace, [{"op": "replace", "path": "/spec/template", "value": template}],
            field_manager=FIELD_MANAGER)
    except ApiException as exc:
        raise api_error(exc, f"restoring the stable template of {namespace}/{workload}") from None
    return True


def wait_scaled_down(namespace: str, name: str, *, timeout_s: float = 120, poll_s: float = 2,
                     client: Any = None) -> None:
    """Wait until the Deployment a Rollout took over is at 0 replicas. With scaleDown: progressively Argo scales
    it down only as the Rollout's own pods become available: a first revision that never does leaves the
    Deployment running, rolling any new template by itself, unanalysed."""
    deadline = time.monotonic() + timeout_s
    while True:
        deployment = read_deployment(namespace, name, client=client) or {}
        replicas = (deployment.get("spec") or {}).get("replicas")
        if replicas == 0:
            return
        if time.monotonic() > deadline:
            raise DeployError(f"deployment {namespace}/{name} still has {replicas} replicas {timeout_s:.0f} s after "
                              "its Rollout became healthy: Argo Rollouts has not taken it over, and it would roll "
                              f"new templates unanalysed. Look with `kubectl argo rollouts get rollout {name} -n "
                              f"{namespace}`")
        time.sleep(poll_s)


PROMOTED, ABORTED, DEGRADED, PAUSED, PROGRESSING = "promoted", "aborted", "degraded", "paused", "progressing"


def canary_state(rollout: dict, workload_generation: int = 0) -> tuple[str, str]:
    """(state, what is happening) of a Rollout, as `kubectl argo rollouts status` judges it (Argo's
    GetRolloutPhase: generation observed, not unpausing, referenced workload observed, then the phase the
    controller computed), with `workload_generation` the Deployment's generation after our apply, so that a
    Rollout not yet showing the new template is not read as done. States: promoted (Healthy, and stable is the
    current pod hash: every step passed), aborted (status.abort: failed analysis, or progress deadline with
    progressDeadlineAbort), degraded (Degraded without an abort: e.g. an invalid spec), paused, progressing."""
    metadata, status = rollout.get("metadata") or {}, rollout.get("status") or {}
    observed = str(status.get("observedGeneration", ""))
    if observed.isdigit() and int(observed) < int(metadata.get("generation", 0)):  # (Argo < 0.10 wrote a hash)
        return PROGRESSING, "waiting for rollout spec update to be observed"
    if status.get("controllerPause") and not status.get("pauseConditions"):
        return PROGRESSING, "waiting for rollout to unpause"
    seen = (metadata.get("annotations") or {}).get(WORKLOAD_GENERATION)
    if workload_generation and (seen is None or int(seen) < workload_generation):
        return PROGRESSING, "waiting for the Rollout to see the Deployment's new template"
    if seen is not None and status.get("workloadObservedGeneration") not in (None, seen):
        return PROGRESSING, "waiting for rollout spec update to be observed for the reference workload"
    phase, message = status.get("phase", ""), status.get("message", "")
    if status.get("abort"):
        return ABORTED, message or "aborted"
    if phase == "Degraded":
        return DEGRADED, message
    if phase == "Healthy" and status.get("stableRS") and status.get("stableRS") == status.get("currentPodHash"):
        return PROMOTED, f"fully promoted: stable is {status['stableRS']}"
    if phase == "Paused":
        step = status.get("currentStepIndex")
        return PAUSED, f"paused at step {step}: {message}" if step is not None else f"paused: {message}"
    step = status.get("currentStepIndex")
    return PROGRESSING, f"step {step}: {message}" if step is not None and message else (message or phase or "starting")


def wait_canary(namespace: str, name: str, *, workload_generation: int = 0, timeout_s: float = 1800,
                poll_s: float = 5, read: Callable[[], dict | None] | None = None,
                client: Any = None) -> tuple[str, str]:
    """Follow the Rollout until it is promoted, aborted or degraded: (state, message). Paused by an inconclusive
    analysis (a person must decide) or on timeout: DeployError saying what to do; nothing is changed (the
    canary goes on, or stays paused, in the cluster)."""
    if read is None:
        def read() -> dict | None:
            return read_rollout(namespace, name, client=client)

    deadline, message = time.monotonic() + timeout_s, ""
    while True:
        rollout = read()
        if rollout is None:
            raise DeployError(f"rollout {namespace}/{name} is gone (deleted while the canary ran?)")
        state, now = canary_state(rollout, workload_generation)
        if now != message:
            log.info("canary of %s: %s", name, now)
            message = now
        if state in (PROMOTED, ABORTED, DEGRADED):
            return state, message
        if state == PAUSED and any(c.get("reason") == "InconclusiveAnalysisRun"
                                   for c in rollout["status"].get("pauseConditions") or []):
            raise DeployError(f"canary of {namespace}/{name} paused: its analysis was inconclusive (too little "
                              "traffic for a verdict); nothing recorded, the registry alias left as it is. A person "
                              f"decides: `kubectl argo rollouts promote {name} -n {namespace}` or `kubectl argo "
                              f"rollouts abort {name} -n {namespace}`, then run the deploy again")
        if time.monotonic() > deadline:
            raise DeployError(f"canary of {namespace}/{name} not finished after {timeout_s:.0f} s ({state}: "
                              f"{message}); nothing recorded, the registry alias left as it is. Follow it with "
                              f"`kubectl argo rollouts get rollout {name} -n {namespace} --watch`, then run the "
                              "deploy again")
        time.sleep(poll_s)

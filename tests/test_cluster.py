"""release/cluster.py: how a rollout is judged done, and what the Kubernetes client sends an API server.

The pure judgements (rollout and canary states) are unit-tested here. What a real API server does with the
requests (server-side apply, conflicts, Job starts, refusals, RBAC) is tested on a real control plane in
test_control_plane.py; the stand-in API server below remains for reading an Argo Rollout's stable revision,
until the canary tests run Argo's controller there.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client as k8s

from distilops.errors import DeployError
from distilops.release import cluster

GROUPS = {"apps/v1": [("deployments", "Deployment", True), ("replicasets", "ReplicaSet", True)],
          "batch/v1": [("jobs", "Job", True)], "rbac.authorization.k8s.io/v1": [("roles", "Role", True)],
          "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
          "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
          "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
          "argoproj.io/v1alpha1": [("rollouts", "Rollout", True), ("analysistemplates", "AnalysisTemplate", True)]}
CORE = [("services", "Service", True), ("configmaps", "ConfigMap", True), ("namespaces", "Namespace", False),
        ("serviceaccounts", "ServiceAccount", True)]


class StandIn(BaseHTTPRequestHandler):
    """API discovery for a few kinds, one Job `distilops-tune` (suspended), and a log of every write."""

    writes: list[dict] = []
    objects: dict[str, dict] = {}  # path -> object (GET)
    on_apply: dict[str, dict] = {}  # path -> what GET answers there once it has been written (a controller's work)
    on_json_patch: dict[str, tuple[str, dict]] = {}  # path JSON-patched -> (another path, what GET answers there)
    replica_sets: list[dict] = []
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "distilops-tune", "namespace": "distilops"},
           "spec": {"suspend": True, "template": {"spec": {"containers": []}}}}

    def log_message(self, *args: object) -> None:
        pass

    def answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @staticmethod
    def resources(entries: list[tuple[str, str, bool]], group_version: str) -> dict:
        return {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
            {"name": name, "kind": kind, "namespaced": namespaced, "singularName": "", "verbs": ["get", "patch"]}
            for name, kind, namespaced in entries]}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        if path == "/version":
            return self.answer(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
        if path == "/api":
            return self.answer(200, {"kind": "APIVersions", "versions": ["v1"]})
        if path == "/api/v1":
            return self.answer(200, self.resources(CORE, "v1"))
        if path == "/apis":
            return self.answer(200, {"kind": "APIGroupList", "groups": [
                {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                 "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in GROUPS]})
        for gv, entries in GROUPS.items():
            if path == f"/apis/{gv}":
                return self.answer(200, self.resources(entries, gv))
        if path == "/apis/batch/v1/namespaces/distilops/jobs/distilops-tune":
            return self.answer(200, StandIn.job)
        if path in StandIn.objects:
            return self.answer(200, StandIn.objects[path])
        if path == "/apis/apps/v1/namespaces/distilops/replicasets":  # ?labelSelector=key=value
            wanted = dict(parse_qsl(urlsplit(self.path).query)).get("labelSelector", "")
            key, _, value = wanted.partition("=")
            items = [rs for rs in StandIn.replica_sets if rs["metadata"]["labels"].get(key) == value]
            return self.answer(200, {"kind": "ReplicaSetList", "apiVersion": "apps/v1", "metadata": {},
                                     "items": items})
        return self.answer(404, {"kind": "Status", "status": "Failure", "message": f"{path} not found",
                                 "reason": "NotFound", "code": 404})

    def do_PATCH(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.writes.append({"path": self.path, "content_type": self.headers["Content-Type"], "body": body})
        for path, after in StandIn.on_apply.items():
            if self.path.split("?")[0] == path:
                StandIn.objects[path] = after
        if self.headers["Content-Type"] == "application/json-patch+json":  # a JSON patch (not an apply)
            for path, (target, after) in StandIn.on_json_patch.items():
                if self.path.split("?")[0] == path:
                    StandIn.objects[target] = after
            return self.answer(200, StandIn.objects.get(self.path.split("?")[0], {"kind": "Status"}))
        if "forbidden" in self.path:
            return self.answer(403, {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                                     "message": 'jobs.batch "forbidden" is forbidden: User "system:serviceaccount:'
                                                'distilops:distilops-pipeline" cannot patch resource "jobs"'})
        if self.path.startswith("/apis/batch/v1/namespaces/distilops/jobs/distilops-tune"):
            StandIn.job["spec"]["suspend"] = body["spec"]["suspend"]
        return self.answer(200, body if "kind" in body else StandIn.job)


@contextlib.contextmanager
def stand_in() -> Iterator[str]:
    """A fresh stand-in API server (no objects, no writes); yields its URL."""
    StandIn.writes, StandIn.objects, StandIn.replica_sets, StandIn.on_apply = [], {}, [], {}
    StandIn.on_json_patch = {}
    StandIn.job["spec"]["suspend"] = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture()
def api():
    with stand_in() as url:
        configuration = k8s.Configuration()
        configuration.host = url
        yield k8s.ApiClient(configuration)


def status(generation=2, observed=2, replicas=2, updated=2, available=2, total=None, conditions=()) -> dict:
    return {"metadata": {"name": "classifier", "generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": total if total is not None else updated,
                       "updatedReplicas": updated, "availableReplicas": available, "conditions": list(conditions)}}


@pytest.mark.parametrize(("deployment", "done", "says"), [
    (status(observed=1), False, "spec update to be observed"),
    (status(updated=1, total=3), False, "1 of 2 new replicas updated"),
    (status(updated=2, total=3), False, "1 old replicas pending termination"),
    (status(available=1), False, "1 of 2 updated replicas available"),
    (status(), True, "2 replicas up to date and available"),
])
def test_rollout_state_judges_as_kubectl_does(deployment, done, says):
    got_done, got_says = cluster.rollout_state(deployment)
    assert got_done is done and says in got_says


def test_a_rollout_past_its_deadline_fails_at_once():
    stuck = status(available=1, conditions=[{"type": "Progressing", "status": "False",
                                             "reason": "ProgressDeadlineExceeded",
                                             "message": 'ReplicaSet "classifier-7c9" has timed out progressing.'}])
    with pytest.raises(DeployError, match="exceeded its progress deadline: ReplicaSet"):
        cluster.wait_rollout("distilops", "classifier", read=lambda: stuck, poll_s=0)


def test_wait_rollout_follows_the_status_until_done_or_timeout():
    states = iter([status(observed=1), status(updated=1, total=3), status(available=1), status()])
    assert cluster.wait_rollout("distilops", "classifier", read=lambda: next(states), poll_s=0) == \
        "2 replicas up to date and available"
    with pytest.raises(DeployError, match="not complete after 0 s: 1 of 2 updated replicas available"):
        cluster.wait_rollout("distilops", "classifier", read=lambda: status(available=1), timeout_s=0.05, poll_s=0.01)


def test_no_credentials_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DeployError, match="no cluster credentials"):
        cluster.api_client()


def test_the_namespace_comes_from_the_service_account(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "missing")
    assert cluster.current_namespace("fallback") == "fallback"  # outside a pod
    token_dir = tmp_path / "serviceaccount"
    token_dir.mkdir()
    (token_dir / "namespace").write_text("team-a\n")
    monkeypatch.setattr(cluster, "SERVICE_ACCOUNT_NAMESPACE", token_dir / "namespace")
    assert cluster.current_namespace() == "team-a"


def test_start_workers_without_a_cluster_says_so(tmp_path, monkeypatch):
    """What the pipeline Job's script sees where it has no service account: one line and exit 1 (the script
    then goes on, and its own distill stage runs every trial)."""
    from typer.testing import CliRunner

    from distilops.cli import app

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    result = CliRunner().invoke(app, ["start-workers"])
    assert result.exit_code == 1 and "no cluster credentials" in result.output and "Traceback" not in result.output


# --- Argo Rollouts: a canary's progress, and what the cluster serves before a release -----------------------

ROLLOUT_PATH = "/apis/argoproj.io/v1alpha1/namespaces/distilops/rollouts/distilops-classifier"
DEPLOYMENT_PATH = "/apis/apps/v1/namespaces/distilops/deployments/distilops-classifier"


def rollout(*, phase="Progressing", message="", abort=False, stable="6d4f", current="7b9c", step=1, generation=3,
            observed="3", workload=5, workload_observed="5", pause=None, controller_pause=False) -> dict:
    """A Rollout as Argo Rollouts v1.9's controller reports it (status fields of the vendored CRD)."""
    status = {"phase": phase, "message": message, "stableRS": stable, "currentPodHash": current,
              "observedGeneration": observed, "workloadObservedGeneration": workload_observed,
              "currentStepIndex": step, "controllerPause": controller_pause, "replicas": 3, "updatedReplicas": 1,
              "availableReplicas": 3, "readyReplicas": 3}
    if abort:
        status.update(abort=True, abortedAt="2026-01-01T00:00:00Z")
    if pause:
        status["pauseConditions"] = [{"reason": pause, "startTime": "2026-01-01T00:00:00Z"}]
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "distilops-classifier", "namespace": "distilops", "generation": generation,
                         "annotations": {"rollout.argoproj.io/workload-generation": str(workload)}},
            "spec": {}, "status": status}


ABORTED = ('RolloutAborted: Rollout aborted update to revision 4: Metric "agreement-vs-stable" assessed Failed due '
           'to failed (3) > failureLimit (2)')


@pytest.mark.parametrize(("found", "state", "says"), [
    (rollout(phase="Healthy", stable="7b9c", current="7b9c", step=4), "promoted", "fully promoted: stable is 7b9c"),
    (rollout(phase="Degraded", message=ABORTED, abort=True), "aborted", 'Metric "agreement-vs-stable" assessed Failed'),
    (rollout(phase="Degraded", message="InvalidSpec: The Rollout is invalid"), "degraded", "InvalidSpec"),
    (rollout(phase="Paused", message="CanaryPauseStep", pause="CanaryPauseStep"), "paused", "step 1: CanaryPauseStep"),
    (rollout(message="more replicas need to be updated"), "progressing", "step 1: more replicas need to be updated"),
    # Healthy on the old revision while the controller has not seen our spec, or the Deployment's new template
    (rollout(phase="Healthy", stable="6d4f", current="6d4f", observed="2"), "progressing", "spec update"),
    (rollout(phase="Healthy", stable="6d4f", current="6d4f", workload=4, workload_observed="4"), "progressing",
     "see the Deployment's new template"),
    (rollout(phase="Healthy", stable="6d4f", current="6d4f", workload_observed="4"), "progressing", "reference"),
    (rollout(phase="Paused", controller_pause=True), "progressing", "unpause"),
])
def test_canary_state_judges_as_kubectl_argo_rollouts_does(found, state, says):
    got_state, got_says = cluster.canary_state(found, workload_generation=5)
    assert got_state == state and says in got_says


def test_wait_canary_follows_the_rollout_to_its_end_or_times_out():
    states = iter([rollout(observed="2"), rollout(), rollout(phase="Paused", pause="CanaryPauseStep", step=1),
                   rollout(step=2), rollout(phase="Healthy", stable="7b9c", current="7b9c", step=4)])
    assert cluster.wait_canary("distilops", "distilops-classifier", workload_generation=5, read=lambda: next(states),
                               poll_s=0) == ("promoted", "fully promoted: stable is 7b9c")
    aborted = rollout(phase="Degraded", message=ABORTED, abort=True)
    assert cluster.wait_canary("distilops", "distilops-classifier", read=lambda: aborted, poll_s=0)[0] == "aborted"
    paused = rollout(phase="Paused", message="CanaryPauseStep", pause="CanaryPauseStep")
    with pytest.raises(DeployError, match=r"not finished after 0 s \(paused: paused at step 1: CanaryPauseStep.*"
                                          r"nothing recorded.*kubectl argo rollouts get rollout distilops-classifier "
                                          r"-n distilops --watch"):
        cluster.wait_canary("distilops", "distilops-classifier", read=lambda: paused, timeout_s=0.05, poll_s=0.01)
    # paused by an inconclusive analysis: nothing more will happen without a person, so it says so at once
    inconclusive = rollout(phase="Paused", message="InconclusiveAnalysisRun", pause="InconclusiveAnalysisRun")
    with pytest.raises(DeployError, match=r"paused: its analysis was inconclusive.*nothing recorded.*`kubectl argo "
                                          r"rollouts promote distilops-classifier -n distilops` or"):
        cluster.wait_canary("distilops", "distilops-classifier", read=lambda: inconclusive, timeout_s=600, poll_s=0)
    with pytest.raises(DeployError, match="is gone"):
        cluster.wait_canary("distilops", "distilops-classifier", read=lambda: None, poll_s=0)


def replica_set(hash_: str, version: str, release: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"distilops-classifier-{hash_}", "namespace": "distilops",
                         "labels": {"rollouts-pod-template-hash": hash_}},
            "spec": {"selector": {"matchLabels": {"rollouts-pod-template-hash": hash_}}, "template": {
                "metadata": {"labels": {"distilops.ai/registry-version": version},
                             "annotations": {"distilops.ai/release-version": release}},
                "spec": {"containers": []}}}}


def deployment(version: str, available: int) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "distilops-classifier", "namespace": "distilops", "generation": 7},
            "spec": {"selector": {"matchLabels": {}}, "template": {
                "metadata": {"labels": {"distilops.ai/registry-version": version}}, "spec": {"containers": []}}},
            "status": {"availableReplicas": available}}


def test_what_the_cluster_serves_is_read_from_the_stable_revision(api):
    """Under a Rollout: its stable ReplicaSet's template, not the Deployment's (after an aborted canary that
    still names the canary). Without one: a Deployment with available pods. Neither: a first release."""
    assert cluster.stable_template("distilops", "distilops-classifier", client=api) is None  # nothing there
    StandIn.objects[DEPLOYMENT_PATH] = deployment("8", available=0)
    assert cluster.stable_template("distilops", "distilops-classifier", client=api) is None  # created, not serving
    StandIn.objects[DEPLOYMENT_PATH] = deployment("6", available=2)  # a live Deployment, about to be migrated
    assert cluster.stable_template("distilops", "distilops-classifier", client=api)["labels"] == {
        "distilops.ai/registry-version": "6"}
    StandIn.objects[DEPLOYMENT_PATH] = deployment("8", available=0)  # Argo scaled it down; it names the canary
    StandIn.objects[ROLLOUT_PATH] = rollout(phase="Degraded", abort=True, stable="6d4f", current="7b9c")
    StandIn.replica_sets = [replica_set("6d4f", "6", "5"), replica_set("7b9c", "8", "7")]
    template = cluster.stable_template("distilops", "distilops-classifier", client=api)
    assert template["annotations"] == {"distilops.ai/release-version": "5"}
    assert cluster.read_deployment("distilops", "distilops-classifier", client=api)["metadata"]["generation"] == 7
    assert cluster.read_rollout("distilops", "other", client=api) is None
    StandIn.objects[ROLLOUT_PATH] = rollout(stable="")  # a new Rollout, nothing stable yet
    assert cluster.stable_template("distilops", "distilops-classifier", client=api) is None

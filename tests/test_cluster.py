"""release/cluster.py: how a rollout is judged done, and what the Kubernetes client sends an API server.

No Kubernetes API server can run here (docs/stack.md), so the requests go over real HTTP to a small
stand-in that answers API discovery and records what it is sent (and holds one Job): the real `kubernetes`
client, its discovery and its serialisation run; what a real server would do with the requests is not tested.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client as k8s

from distilops.errors import DeployError
from distilops.release import cluster

GROUPS = {"apps/v1": [("deployments", "Deployment", True)], "batch/v1": [("jobs", "Job", True)],
          "rbac.authorization.k8s.io/v1": [("roles", "Role", True)]}
CORE = [("services", "Service", True), ("configmaps", "ConfigMap", True), ("namespaces", "Namespace", False)]


class StandIn(BaseHTTPRequestHandler):
    """API discovery for a few kinds, one Job `distilops-tune` (suspended), and a log of every write."""

    writes: list[dict] = []
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
        return self.answer(404, {"kind": "Status", "status": "Failure", "message": f"{path} not found",
                                 "reason": "NotFound", "code": 404})

    def do_PATCH(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.writes.append({"path": self.path, "content_type": self.headers["Content-Type"], "body": body})
        if "forbidden" in self.path:
            return self.answer(403, {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                                     "message": 'jobs.batch "forbidden" is forbidden: User "system:serviceaccount:'
                                                'distilops:distilops-pipeline" cannot patch resource "jobs"'})
        if self.path.startswith("/apis/batch/v1/namespaces/distilops/jobs/distilops-tune"):
            StandIn.job["spec"]["suspend"] = body["spec"]["suspend"]
        return self.answer(200, body if "kind" in body else StandIn.job)


@pytest.fixture()
def api():
    StandIn.writes = []
    StandIn.job["spec"]["suspend"] = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = k8s.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield k8s.ApiClient(configuration)
    server.shutdown()


def test_apply_is_server_side_with_distilops_as_field_manager(api):
    documents = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "distilops-config", "namespace": "distilops"},
         "data": {"A": "1"}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "distilops-classifier", "namespace": "distilops"}, "spec": {"template": {}}},
    ]
    assert cluster.apply(documents, client=api) == ["ConfigMap/distilops-config", "Deployment/distilops-classifier"]
    paths = [w["path"] for w in StandIn.writes]
    assert paths[0].startswith("/api/v1/namespaces/distilops/configmaps/distilops-config?")
    assert paths[1].startswith("/apis/apps/v1/namespaces/distilops/deployments/distilops-classifier?")
    for write, doc in zip(StandIn.writes, documents, strict=True):
        assert write["content_type"] == "application/apply-patch+yaml" and write["body"] == doc
        assert "fieldManager=distilops" in write["path"] and "force=true" in write["path"]


def test_an_unknown_kind_is_a_clear_error(api):
    rollout = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "metadata": {"name": "r", "namespace": "x"}}
    with pytest.raises(DeployError, match="does not know argoproj.io/v1alpha1 Rollout"):
        cluster.apply([rollout], client=api)
    assert StandIn.writes == []


def test_start_job_un_suspends_once(api):
    assert cluster.start_job("distilops", "distilops-tune", client=api) is True
    (write,) = StandIn.writes
    assert write["body"] == {"spec": {"suspend": False}} and "fieldManager=distilops" in write["path"]
    assert cluster.start_job("distilops", "distilops-tune", client=api) is False  # already running: no write
    assert len(StandIn.writes) == 1


def test_a_refusal_names_the_server_reason_not_a_traceback(api):
    with pytest.raises(DeployError, match="starting job distilops/missing: 404 .*not found"):
        cluster.start_job("distilops", "missing", client=api)


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

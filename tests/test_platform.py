"""k8s/platform run for real where this machine allows: the MLflow server started with exactly the command
and environment of the rendered manifest, called with the Host headers a cluster's clients send."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving import Server, free_port
from test_k8s import one, pod_spec, render

MANIFEST_PORT = "--port 5000"


def mlflow_container(docs: list[dict]) -> tuple[dict, dict[str, str]]:
    """The MLflow container of the rendered platform and the environment its ConfigMaps give it."""
    container = next(c for c in pod_spec(one(docs, "Deployment", "mlflow"))["containers"] if c["name"] == "mlflow")
    env = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", name)["data"])
    return container, env


@pytest.mark.slow
def test_mlflow_answers_port_forward_and_in_cluster_hosts_and_refuses_others(tmp_path):
    """`distilops promote|image|deploy` from a workstation reach the server through `kubectl port-forward`,
    which sends `Host: localhost:<port>`; pods use the Service's names. An unknown host is refused (403),
    while /health answers it too: the readiness probe could never show a refusal, so this test does."""
    container, env = mlflow_container(render("platform"))
    script = container["args"][0]
    assert container["command"] == ["/bin/sh", "-c"] and MANIFEST_PORT in script
    port = free_port()  # the manifest's own command, with a free port and a local artifacts folder
    script = script.replace(MANIFEST_PORT, f"--port {port}").replace("/artifacts", str(tmp_path / "artifacts"))
    server_env = {**os.environ, **env, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                  "HOME": str(tmp_path),  # `mlflow` on the PATH, as in the image
                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = Server(["/bin/sh", "-c", script], server_env, port, tmp_path / "mlflow.log", cwd=tmp_path,
                    ready_path="/health")
    try:
        server.wait_ready(timeout=120)
        api = f"{server.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        for host in ("localhost:5000", "127.0.0.1:5000", "localhost:8080", "mlflow", "mlflow:5000",
                     "mlflow.distilops.svc:5000", "mlflow.distilops.svc.cluster.local:5000"):
            assert httpx.get(api, headers={"Host": host}).status_code == 200, host
        assert httpx.get(api, headers={"Host": "attacker.example.com"}).status_code == 403
        assert httpx.get(f"{server.url}/health", headers={"Host": "attacker.example.com"}).status_code == 200
    finally:
        server.stop()


def test_the_mlflow_command_is_a_shell_line_the_test_can_run():
    """The slow test runs the manifest's own command; it relies on its shape."""
    container, env = mlflow_container(render("platform"))
    assert "--allowed-hosts" not in container["args"][0]  # hosts come from mlflow-config alone
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"localhost:*", "127.0.0.1:*", "mlflow:*", "mlflow.distilops.svc.cluster.local:*"} <= set(hosts)
    assert subprocess.run(["/bin/sh", "-n", "-c", container["args"][0]]).returncode == 0

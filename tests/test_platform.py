"""k8s/platform run for real where this machine allows: the MLflow server started with exactly the command
and environment of the rendered manifest (MLflow's basic-auth app), called with the Host headers and the
credentials a cluster's clients send."""

from __future__ import annotations

import configparser
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving import Server, free_port
from test_k8s import one, pod_spec, render

MANIFEST_PORT = "--port 5000"
SECRET = "distilops-platform"
ADMIN = ("admin", "test-admin-password")


def mlflow_container(docs: list[dict]) -> tuple[dict, dict[str, str]]:
    """The MLflow container of the rendered platform and the environment its ConfigMaps give it."""
    container = next(c for c in pod_spec(one(docs, "Deployment", "mlflow"))["containers"] if c["name"] == "mlflow")
    env = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", name)["data"])
    return container, env


def platform_secret(folder: Path) -> dict[str, str]:
    """What `kubectl create secret generic distilops-platform` (k8s/platform/kustomization.yaml) holds for the
    MLflow server, as a test gives it: SQLite for PostgreSQL, one database for runs and users as there, and a
    `%` in the URI as a URL-encoded password has (SQLAlchemy decodes `%2D`: the file is mlflow-store.db)."""
    store = f"sqlite:///{folder / 'mlflow%2Dstore.db'}"
    return {"MLFLOW_BACKEND_STORE_URI": store, "MLFLOW_AUTH_DATABASE_URI": store,
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0], "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key"}


def server_env(container: dict, config: dict[str, str], secret: dict[str, str], tmp: Path) -> dict[str, str]:
    """The container's environment on this machine: its ConfigMap, its own values with the /tmp emptyDir moved
    to `tmp`, and every Secret key it names taken from `secret`, which must hold exactly those."""
    env, wanted = {**config}, set()
    for item in container["env"]:
        if "value" in item:
            value = item["value"]
            env[item["name"]] = f"{tmp}{value[4:]}" if value == "/tmp" or value.startswith("/tmp/") else value
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET and not ref.get("optional"), item
            env[item["name"]] = secret[ref["key"]]
            wanted.add(ref["key"])
    assert wanted == set(secret)
    return env


@pytest.mark.slow
def test_mlflow_wants_credentials_answers_known_hosts_and_serves_a_client(tmp_path, monkeypatch):
    """The server runs MLflow's basic-auth app: no call but the probe's answers without credentials. Known
    credentials then get answers for the Host headers of `kubectl port-forward` (`localhost:<port>`, what
    `distilops promote|image|deploy` use from a workstation) and of the Service's names (pods); an unknown host
    is refused (403), while /health answers it too: the readiness probe could never show a refusal."""
    container, config = mlflow_container(render("platform"))
    script = container["args"][0]
    assert container["command"] == ["/bin/sh", "-c"] and MANIFEST_PORT in script
    port = free_port()  # the manifest's own command, with a free port and a local artifacts folder
    script = script.replace(MANIFEST_PORT, f"--port {port}").replace("/artifacts", str(tmp_path / "artifacts"))
    env = {**os.environ, **server_env(container, config, platform_secret(tmp_path), tmp_path),  # `mlflow` on the PATH
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # as in the image
    probe = container["readinessProbe"]["httpGet"]["path"]
    server = Server(["/bin/sh", "-c", script], env, port, tmp_path / "mlflow.log", cwd=tmp_path, ready_path=probe)
    # Each call with credentials checks the password hash (scrypt) twice: a fraction of a second of CPU, and
    # more on a busy machine than httpx's default 5 s allow.
    http = httpx.Client(timeout=60)
    try:
        server.wait_ready(timeout=120)  # the probe's path answers 200 without credentials
        api = f"{server.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        anonymous = http.get(api)
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Basic")
        assert http.get(api, auth=(ADMIN[0], "not-the-password")).status_code == 401
        for host in ("localhost:5000", "127.0.0.1:5000", "localhost:8080", "mlflow", "mlflow:5000",
                     "mlflow.distilops.svc:5000", "mlflow.distilops.svc.cluster.local:5000"):
            assert http.get(api, headers={"Host": host}, auth=ADMIN).status_code == 200, host
        assert http.get(api, headers={"Host": "attacker.example.com"}, auth=ADMIN).status_code == 403
        assert http.get(f"{server.url}{probe}", headers={"Host": "attacker.example.com"}).status_code == 200

        import mlflow  # a real client, logged in the way the Jobs and the CLI are: MLflow's own variables

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        experiment_id = client.create_experiment("distilops-auth-test")
        assert client.get_experiment(experiment_id).name == "distilops-auth-test"
        client.create_registered_model("distilops-auth-test-model")
        assert client.get_registered_model("distilops-auth-test-model").name == "distilops-auth-test-model"
    finally:
        http.close()
        server.stop()
    with sqlite3.connect(tmp_path / "mlflow-store.db") as db:  # runs and users in the one database
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"experiments", "registered_models", "alembic_version", "users", "alembic_version_auth"} <= tables


def test_the_mlflow_command_is_a_shell_line_the_test_can_run(tmp_path):
    """The slow test runs the manifest's own command; it relies on its shape. Run here up to `mlflow` (a stand-in
    that records its arguments): the auth app's config file it writes, read the way MLflow reads it."""
    docs = render("platform")
    container, config = mlflow_container(docs)
    script = container["args"][0]
    assert "--allowed-hosts" not in script  # hosts come from mlflow-config alone
    hosts = config["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"localhost:*", "127.0.0.1:*", "mlflow:*", "mlflow.distilops.svc.cluster.local:*"} <= set(hosts)
    assert subprocess.run(["/bin/sh", "-n", "-c", script]).returncode == 0

    secret = platform_secret(tmp_path)
    secret["MLFLOW_AUTH_DATABASE_URI"] = "postgresql://postgres:p%40ss@postgres.distilops.svc:5432/mlflow"
    env = server_env(container, config, secret, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "args"}\n')
    (bin_dir / "mlflow").chmod(0o755)
    run = subprocess.run(["/bin/sh", "-c", script], env={**env, "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["server", "--app-name", "basic-auth"]
    assert args[args.index("--backend-store-uri") + 1] == secret["MLFLOW_BACKEND_STORE_URI"]

    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert ini.parent == tmp_path  # in the /tmp emptyDir: the root filesystem is read-only
    tmp_volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volumes = pod_spec(one(docs, "Deployment", "mlflow"))["volumes"]
    assert "emptyDir" in next(v for v in volumes if v["name"] == tmp_volume)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert ini.stat().st_mode & 0o077 == 0  # it holds the database password
    parser = configparser.ConfigParser()  # as mlflow.server.auth.config.read_auth_config: with interpolation
    parser.read(ini)
    assert parser["mlflow"]["database_uri"] == secret["MLFLOW_AUTH_DATABASE_URI"]
    assert parser["mlflow"]["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert "admin_password" not in parser["mlflow"]  # MLflow takes the admin from MLFLOW_AUTH_ADMIN_* itself
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(env)

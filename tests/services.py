"""Real PostgreSQL and MLflow tracking servers for the tests, on 127.0.0.1, started and stopped by them.

PostgreSQL is Debian's server (`make test` installs the `postgresql` package as root): a throwaway
cluster in a temporary folder, trust authentication, a free port. It refuses to run as root, so as
root it runs as the `postgres` user the package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from serving import Server, free_port

AS_ROOT = os.geteuid() == 0


def postgres_bin() -> Path:
    found = shutil.which("initdb")
    folders = [Path(found).resolve().parent] if found else []
    folders += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in folders:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: `apt-get install postgresql` "
                       "(`make test` installs it when run as root)")


class Postgres:
    """A PostgreSQL cluster of its own, for one test session."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="distilops-pg-"))  # short: the socket path has a length limit
        self.port = free_port()
        if AS_ROOT:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if AS_ROOT:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def start(self) -> Postgres:
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"  # the documented form: psycopg 3

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Server:
    """`mlflow server` on a free port: runs and models in `backend_uri`, artifacts proxied to a folder
    (clients see `mlflow-artifacts:` URIs and never touch the folder, as with a team's server). Ready
    when /health answers, once the database schema is migrated (~25 s on a new PostgreSQL database)."""
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    return Server([mlflow, "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
                   artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                  {**os.environ}, port, log, cwd=artifacts.parent, ready_path="/health")


class ImageRegistry:
    """Debian's `docker-registry` (the CNCF Distribution registry, what most registries run) on 127.0.0.1 over
    plain HTTP, storing in a temporary folder. `make test` installs the package as root."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry not found: `apt-get install docker-registry` (`make test` installs it "
                               "when run as root)")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        config = root / "registry.yml"
        config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'storage'}\n"
                          f"  delete:\n    enabled: true\nhttp:\n  addr: {self.host}\nlog:\n  level: warn\n")
        self.server = Server([binary, "serve", str(config)], {**os.environ}, self.port, root / "registry.log",
                             cwd=root, ready_path="/v2/")

    def __enter__(self) -> ImageRegistry:
        self.server.wait_ready(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def push(self, repository: str, tag: str, content: bytes) -> str:
        """Put a minimal OCI image (an empty config and one layer holding `content`) under `repository:tag`
        through the distribution API, as `podman push` would; returns its manifest digest."""
        import hashlib
        import json

        import httpx

        def upload(blob: bytes) -> str:
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            started = httpx.post(f"http://{self.host}/v2/{repository}/blobs/uploads/")
            location = started.headers["location"]
            location = location if location.startswith("http") else f"http://{self.host}{location}"
            separator = "&" if "?" in location else "?"
            done = httpx.put(f"{location}{separator}digest={digest}", content=blob,
                             headers={"Content-Type": "application/octet-stream"})
            assert done.status_code == 201, done.text
            return digest

        config = b"{}"
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": upload(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": upload(content),
                        "size": len(content)}]}).encode()
        put = httpx.put(f"http://{self.host}/v2/{repository}/manifests/{tag}", content=manifest,
                        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert put.status_code == 201, put.text
        return put.headers["docker-content-digest"]

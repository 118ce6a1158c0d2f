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

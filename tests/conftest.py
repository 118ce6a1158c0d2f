"""Shared fixtures: a temporary copy of the repository that real `dvc repro` runs in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvcignore")


def load_stage(name: str):
    """A stage script (stages/<name>.py) as a module, to test its functions without running the stage."""
    import importlib.util

    if str(ROOT / "stages") not in sys.path:  # each script imports stages/_preflight.py first, as `python` finds it
        sys.path.append(str(ROOT / "stages"))
    spec = importlib.util.spec_from_file_location(f"{name}_stage", ROOT / "stages" / f"{name}.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class RepoCopy:
    """A git + DVC repository holding this project's pipeline, with editable params.yaml."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for item in COPIED:
            src, dst = ROOT / item, path / item
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            elif src.exists():
                shutil.copy2(src, dst)
        self.env = {
            **os.environ,
            # stage commands say `python`: make it this interpreter (the project's venv)
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{path / 'mlflow.db'}",
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.com",
        }
        run(["git", "init", "-q"], path)
        run(["git", "add", "-A"], path)
        run(["git", "commit", "-qm", "copy"], path, self.env)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, updates: dict) -> None:
        params = self.params()
        for dotted, value in updates.items():
            node = params
            *parents, key = dotted.split(".")
            for part in parents:
                node = node[part]
            node[key] = value
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run([str(Path(sys.executable).parent / "dvc"), *args], self.path, self.env, check)


@pytest.fixture()
def repo_copy(tmp_path) -> RepoCopy:
    return RepoCopy(tmp_path / "repo")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/services.py)."""
    from services import Postgres

    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """A real control plane for the session (tests/cluster/controlplane.py): upstream's etcd, kube-apiserver,
    kube-controller-manager, kube-scheduler, and kwok's simulated nodes. `make test` builds it first."""
    from cluster.controlplane import ControlPlane, built

    binaries = built()
    if binaries is None:
        pytest.fail("the test control plane is not built: `make cluster-build` (Go; about 25 min cold, cached after)")
    plane = ControlPlane(binaries, tmp_path_factory.mktemp("control-plane"))
    try:
        yield plane.start()
    finally:
        plane.stop()

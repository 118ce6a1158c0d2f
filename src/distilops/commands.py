"""Running an external tool (pip, buildah, podman, kubectl) the one way: its output captured, and a
failure turned into the caller's DistilopsError with the tool's last lines, never a traceback."""

from __future__ import annotations

import shutil
import subprocess

from distilops.errors import DistilopsError


def run_command(cmd: list[str], *, what: str, error: type[DistilopsError], missing: str = "",
                tail_lines: int = 8, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` (text mode, output captured). A missing tool raises `error` with the `missing` hint;
    a non-zero exit raises `error` saying `what` failed, with the exit status and the output's tail."""
    if shutil.which(cmd[0]) is None:
        raise error(f"{cmd[0]} not found" + (f": {missing}" if missing else ""))
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-tail_lines:])
        raise error(f"{what} (exit {result.returncode}):\n{tail}")
    return result

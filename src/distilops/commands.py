"""Running an external tool (pip, buildah, podman, kubectl) the one way: its output captured, and a
failure turned into the caller's DistilopsError with the tool's last lines, never a traceback."""

from __future__ import annotations

import shutil
import subprocess

from distilops.errors import DistilopsError


def output_tail(result: subprocess.CompletedProcess, lines: int = 8) -> str:
    """The last `lines` lines of what a finished command printed (stderr, else stdout)."""
    return "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-lines:])


def run_command(cmd: list[str], *, what: str, error: type[DistilopsError], missing: str = "",
                tail_lines: int = 8, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` (text mode, output captured). A missing tool raises `error` with the `missing` hint;
    a non-zero exit raises `error` saying `what` failed, with the exit status and the output's tail."""
    if shutil.which(cmd[0]) is None:
        raise error(f"{cmd[0]} not found" + (f": {missing}" if missing else ""))
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise error(f"{what} (exit {result.returncode}):\n{output_tail(result, tail_lines)}")
    return result

"""What every DVC stage script shares: running its `main` (logging set up, any `DistilopsError`
turned into `<stage>: error: ...` on stderr with exit status 1, no traceback: the message names
the fix), reading other stages' JSON outputs and writing its own.

    if __name__ == "__main__":
        run_stage("prepare", main)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distilops import logs
from distilops.errors import DataError, DistilopsError


def run_stage(name: str, main: Callable[[], object]) -> None:
    logs.setup(names=("distilops", name))  # the stage script logs as `name`
    try:
        main()
    except DistilopsError as exc:
        sys.exit(f"{name}: error: {exc}")


def read_json(path: Path) -> Any:
    """Read another stage's JSON output; missing or unreadable is a clear error naming the file and the fix."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is missing or unreadable ({exc}): run `dvc repro` to rebuild it") from None


def write_json(path: Path, value: Any) -> None:
    """Write a metrics or report file (indented, newline-terminated: readable in diffs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")

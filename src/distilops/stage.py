"""What every DVC stage script shares: running its `main` (logging set up, any `DistilopsError`
turned into `<stage>: error: ...` on stderr with exit status 1, no traceback: the message names
the fix), reading other stages' JSON outputs and writing its own (JSON, and CSV tables: `table_csv`).

    if __name__ == "__main__":
        run_stage("prepare", main)
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
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


def table_csv(rows: Sequence[dict], columns: Sequence[str] = ()) -> str:
    """Rows as CSV text: `columns` first, then every other key any row has, in the order they first appear (a
    row without a column leaves it empty). With no rows, the header of `columns` alone."""
    names = list(dict.fromkeys([*columns, *(key for row in rows for key in row)]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()

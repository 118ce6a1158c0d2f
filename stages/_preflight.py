"""Imported first by every stage script, before anything outside the standard library: a stage run by a Python
that lacks the project's packages stops with one line naming the fix, not a traceback.

DVC runs each stage as `python stages/<name>.py` with the first `python` on the PATH. Outside the venv that is the
system's, which lacks the project (`.venv/bin/dvc exp run ...` from a shell that never entered the venv fails
this way: `No module named 'matplotlib'`). A missing module the script's imports (or its run) hit becomes
`<stage>: error: ...` on stderr, exit status 1, like every other error a stage reports (distilops.stage).

Not a stage, and not a DVC dependency of the stages: it changes no output (it passes, or the stage stops before
writing any), so editing it reruns nothing. Standard library only: it must import where nothing else does.
"""

import sys
from pathlib import Path

VENV = Path(__file__).resolve().parents[1] / ".venv"  # what `make run` creates


def explain(exc_type, exc, tb) -> None:
    if not issubclass(exc_type, ModuleNotFoundError):
        sys.__excepthook__(exc_type, exc, tb)
        return
    stage = Path(sys.argv[0]).stem
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    fix = ("the venv lacks it: reinstall it with `rm .venv/.installed && make run`" if in_venv else
           "run the pipeline from the project's venv: `make run`, or enter it first (`. .venv/bin/activate`, "
           "then `dvc ...`); `.venv/bin/dvc` alone still runs the system's `python`")
    print(f"{stage}: error: {exc} ({sys.executable}): {fix}", file=sys.stderr)


sys.excepthook = explain

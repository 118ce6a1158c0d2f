"""Logging set-up for the entry points (stage scripts, the CLI, the service); library code only logs.

Messages read `[stage] text` (`[tuning] ...` for distilops.pipeline.tuning) and go through tqdm, so they
never break a progress bar. Third-party progress bars that add nothing (one per model load,
one per artifact download) are turned off here, at start-up, not on import.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm


class TqdmHandler(logging.Handler):
    """Writes above any active tqdm bar instead of through it, to whatever sys.stdout/stderr is now."""

    def __init__(self, stderr: bool = False) -> None:
        super().__init__()
        self.stderr = stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr if self.stderr else sys.stdout)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


class ShortNameFormatter(logging.Formatter):
    """`[tuning] ...` rather than `[distilops.pipeline.tuning] ...`."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name.rsplit(".", 1)[-1] if record.name.startswith("distilops.") else record.name
        prefix = f"[{name}] " if record.levelno < logging.WARNING else f"[{name}] {record.levelname.lower()}: "
        return prefix + record.getMessage()


def setup(stderr: bool = False, level: int = logging.INFO, names: tuple[str, ...] = ("distilops",)) -> None:
    """Route the `names` loggers (distilops' own) to stdout (or stderr) at `level`; other libraries
    log warnings only, and their progress bars that add nothing are turned off."""
    handler = TqdmHandler(stderr)
    handler.setFormatter(ShortNameFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)  # other libraries: warnings and errors only
    for name in names:
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per artifact round trip
    transformers = sys.modules.get("transformers")  # only if in use: the serving image has none
    if transformers is not None:
        transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar per model load

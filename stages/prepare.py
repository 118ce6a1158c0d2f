"""DVC stage `prepare`: load, clean, split and validate the data set; write splits and a report."""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import logging

from distilops import paths
from distilops.config import PrepareConfig, load_section
from distilops.pipeline.data import prepare
from distilops.stage import run_stage, write_json

log = logging.getLogger("prepare")


def main() -> None:
    cfg = load_section(PrepareConfig)
    splits, report = prepare(cfg)
    paths.PREPARED.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        frame.to_parquet(paths.PREPARED / f"{name}.parquet", index=False)
    write_json(paths.DATA_REPORT, report)
    sizes = ", ".join(f"{n} {s['examples']}" for n, s in report["splits"].items())
    log.info("%d examples (%s); data hash %s", report["total_examples"], sizes, report["data_hash"][:12])


if __name__ == "__main__":
    run_stage("prepare", main)

"""DVC stage `prepare`: load, clean, split and validate the data set; write splits and a report."""

import json
import sys
from pathlib import Path

from distilops.config import ConfigError, PrepareConfig, load_section
from distilops.data import DataError, prepare

OUT = Path("data/prepared")


def main() -> None:
    cfg = load_section(PrepareConfig, "prepare")
    splits, report = prepare(cfg)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        frame.to_parquet(OUT / f"{name}.parquet", index=False)
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    sizes = ", ".join(f"{n} {s['examples']}" for n, s in report["splits"].items())
    print(f"[prepare] {report['total_examples']} examples ({sizes}); data hash {report['data_hash'][:12]}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as exc:
        sys.exit(f"prepare: error: {exc}")

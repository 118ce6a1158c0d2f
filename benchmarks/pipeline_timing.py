"""Wall-clock time of every pipeline stage on this machine, forced and in order: `dvc repro -s -f STAGE`.

    python benchmarks/pipeline_timing.py          # rewrites the pipeline's outputs; starts a fresh study

It runs in the repository itself (its outputs are the pipeline's), so the Optuna study and training
checkpoints are removed first: a resumed study would time nothing. The asset cache is kept (the
first download adds seconds). Stage output scrolls by; the summary is written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from distilops.pipeline.evaluate import hardware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/pipeline_cpu.json")
    args = parser.parse_args()
    stages = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
    shutil.rmtree("optuna", ignore_errors=True)
    shutil.rmtree("checkpoints", ignore_errors=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        subprocess.run([dvc, "repro", "--single-item", "--force", stage], check=True,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        seconds[stage] = round(time.perf_counter() - start, 1)
        print(f"[timing] {stage}: {seconds[stage]} s", flush=True)
    to_student = sum(seconds[s] for s in stages[: stages.index("distill") + 1])
    result = {"hardware": hardware(os.cpu_count() or 0), "stage_seconds": seconds,
              "up_to_trained_student_seconds": round(to_student, 1),
              "total_seconds": round(sum(seconds.values()), 1),
              "params": {k: v for k, v in yaml.safe_load(Path("params.yaml").read_text()).items()
                         if k in ("teacher", "distill", "max_length")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("stage_seconds", "up_to_trained_student_seconds", "total_seconds")},
                     indent=2))


if __name__ == "__main__":
    main()

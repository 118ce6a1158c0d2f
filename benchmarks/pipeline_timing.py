"""Wall-clock time of every pipeline stage on this machine, forced and in order: `dvc repro -s -f STAGE`.

    python benchmarks/pipeline_timing.py          # rewrites the pipeline's outputs; starts a fresh study

It runs in the repository itself (its outputs are the pipeline's; --project: the tests time a tiny copy of it),
so the Optuna study and training checkpoints are removed first: a resumed study would time nothing. The asset
cache is kept (the first download adds seconds). Stage output scrolls by; the summary is written to --out.
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


def timed_stages(project: Path, chosen: list[str]) -> list[str]:
    """The stages to time, in dvc.yaml's order (a stage reads what the ones before it left)."""
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    unknown = sorted(set(chosen) - set(stages))
    if unknown:
        sys.exit(f"pipeline_timing: error: no such stages in {project / 'dvc.yaml'}: {unknown}")
    return [stage for stage in stages if not chosen or stage in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/pipeline_cpu.json")
    parser.add_argument("--project", type=Path, default=Path("."), help="the DVC project whose stages are timed")
    parser.add_argument("--stages", nargs="+", default=[],
                        help="stages to time, in dvc.yaml's order (default: all); each reads its inputs as left")
    args = parser.parse_args()
    project = args.project
    stages = timed_stages(project, args.stages)
    shutil.rmtree(project / "optuna", ignore_errors=True)
    shutil.rmtree(project / "checkpoints", ignore_errors=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        subprocess.run([dvc, "repro", "--single-item", "--force", stage], check=True, cwd=project,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        seconds[stage] = round(time.perf_counter() - start, 1)
        print(f"[timing] {stage}: {seconds[stage]} s", flush=True)
    # docs/results.md quotes the time to a trained student: the stages up to distill (None if it was not timed)
    to_student = sum(seconds[s] for s in stages[: stages.index("distill") + 1]) if "distill" in stages else None
    result = {"hardware": hardware(os.cpu_count() or 0), "stage_seconds": seconds,
              "up_to_trained_student_seconds": None if to_student is None else round(to_student, 1),
              "total_seconds": round(sum(seconds.values()), 1),
              "params": {k: v for k, v in yaml.safe_load((project / "params.yaml").read_text()).items()
                         if k in ("teacher", "distill", "max_length")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("stage_seconds", "up_to_trained_student_seconds", "total_seconds")},
                     indent=2))


if __name__ == "__main__":
    main()

"""The depth choice's speedups under load, measured the way the distill stage did before issue 30 (the PyTorch
teacher; each model's calls in a block, three rounds; ratio of medians) and the way it does now
(pipeline/served_latency.py: the teacher's ONNX export; every round calls every model once, order rotated;
median of paired per-round ratios), side by side in one run: quiet, then with `--busy` processes each spinning a
core, alternated `--repeats` times. The same ONNX int8 students serve both methods: only the teacher's runtime and
the timing schedule differ.

    python benchmarks/choice_latency.py                      # after `make run` (models/teacher, data/prepared)
    python benchmarks/choice_latency.py --teacher DIR --depths 1 --out FILE   # any teacher folder

Writes benchmarks/results/choice_latency_cpu.json: each method's speedup per depth under each condition and
repeat, and per depth the ratio busy/quiet (1 = load does not move it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distilops.pipeline import served_latency
from distilops.pipeline.modeling import load_classifier, load_tokenizer

SPIN = "import os\nwhile os.getppid() == {parent}: pass"  # a busy core that ends with this process, however it ends
TEXT = "a wonderful, moving film whose second half turns dull and bland, though the cast keeps it alive"


def torch_call(model: torch.nn.Module, input_ids: list[int]):
    ids = torch.tensor([input_ids], dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def call() -> object:
        with torch.inference_mode():
            return model(**inputs).logits
    return call


def before(calls: dict, torch_teacher, n: int) -> dict[str, float]:
    """The pre-issue-30 schedule: PyTorch teacher, one warm-up, 3 rounds of n/3 consecutive calls per model."""
    models = {**{k: v for k, v in calls.items() if k != served_latency.TEACHER},
              served_latency.TEACHER: torch_teacher}
    times: dict[str, list[float]] = {k: [] for k in models}
    for call in models.values():
        call()
    for _ in range(3):
        for key, call in models.items():
            for _ in range(-(-n // 3)):
                started = time.perf_counter()
                call()
                times[key].append(1000 * (time.perf_counter() - started))
    teacher = statistics.median(times[served_latency.TEACHER])
    return {k: teacher / statistics.median(v) for k, v in times.items() if k != served_latency.TEACHER}


def now(calls: dict, n: int) -> dict[str, float]:
    measured = served_latency.summarise(served_latency.time_rounds(calls, n))
    return {k: q["p50"] for k, q in measured["speedup"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per model (params: distill.latency_calls)")
    parser.add_argument("--repeats", type=int, default=3, help="quiet/busy alternations")
    parser.add_argument("--busy", type=int, default=1, help="processes spinning a core each while loaded")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/choice_latency_cpu.json")
    args = parser.parse_args()

    teacher = load_classifier(args.teacher).eval()
    tokenizer = load_tokenizer(args.teacher)
    ids = tokenizer(TEXT, truncation=True, max_length=args.max_length)["input_ids"]
    threads = torch.get_num_threads()
    runs = []
    with tempfile.TemporaryDirectory(prefix="choice-latency-") as scratch:
        calls = served_latency.build_calls(teacher, tokenizer, args.depths, ids, Path(scratch),
                                           max_length=args.max_length, threads=threads)
        torch_teacher = torch_call(teacher, ids)
        for repeat in range(args.repeats):
            for condition in ("quiet", "busy"):
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(parent=os.getpid())])
                            for _ in range(args.busy if condition == "busy" else 0)]
                try:
                    time.sleep(0.5 if spinners else 0)
                    row = {"repeat": repeat, "condition": condition, "before": before(calls, torch_teacher, args.calls),
                           "now": now(calls, args.calls)}
                finally:
                    for spinner in spinners:
                        spinner.kill()
                        spinner.wait()
                runs.append(row)
                print(json.dumps(row), flush=True)

    def ratios(method: str, depth: str) -> list[float]:
        quiet = [r[method][depth] for r in runs if r["condition"] == "quiet"]
        busy = [r[method][depth] for r in runs if r["condition"] == "busy"]
        return [b / q for q, b in zip(quiet, busy, strict=True)]

    summary = {method: {str(d): {"quiet_median": statistics.median(r[method][str(d)] for r in runs
                                                                  if r["condition"] == "quiet"),
                                 "busy_median": statistics.median(r[method][str(d)] for r in runs
                                                                 if r["condition"] == "busy"),
                                 "busy_over_quiet": [round(x, 3) for x in ratios(method, str(d))],
                                 "busy_over_quiet_median": float(np.median(ratios(method, str(d))))}
                        for d in args.depths} for method in ("before", "now")}
    result = {"teacher": args.teacher, "depths": args.depths, "calls": args.calls, "repeats": args.repeats,
              "busy_processes": args.busy, "threads": threads, "cpus": torch.get_num_threads(), "tokens": len(ids),
              "runs": runs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

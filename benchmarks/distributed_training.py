"""Training on 1 vs N processes (pipeline/distributed.py), side by side: wall-clock and per-step loss.

The same BERT-shaped classifier (no dropout: a step is then a function of its batch, so the runs can be compared
step by step) trained by `training.train` at the same global batch, once per process count per round, rounds
interleaved; medians of the rounds and their ratio. Each run is a fresh program that becomes torchrun above one
process, as a stage does, so the time includes starting the processes. Synthetic token ids: nothing to download.

    PYTHONPATH=src python benchmarks/distributed_training.py --processes 1 2 --rounds 3 \\
        --out benchmarks/results/distributed_training_cpu.json

On CPUs the processes share the machine's cores (gloo; torchrun gives each 1 thread): no speed-up is expected on
2 cores, the point is that N processes train the model 1 process trains. On GPUs (nccl) each process has its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def model_and_data(args: argparse.Namespace):
    from transformers import BertConfig, BertForSequenceClassification

    from distilops.pipeline.batching import Examples

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=4 * args.hidden, max_position_embeddings=128,
                        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    rng = np.random.default_rng(0)
    ids = [[2, *rng.integers(5, 1000, size=int(rng.integers(8, 60))).tolist(), 3] for _ in range(args.examples)]
    labels = np.array([int(sum(x) % 2) for x in ids], dtype=np.int64)
    data = Examples(input_ids=ids, labels=labels)
    return model, data.subset(range(0, args.examples - 64)), data.subset(range(args.examples - 64, args.examples))


def worker(args: argparse.Namespace) -> None:
    """One run: `--processes` of them through torchrun; rank 0 writes its losses and times to `--result`."""
    from distilops.config import Distributed
    from distilops.pipeline.distributed import session
    from distilops.pipeline.training import TrainSettings, train

    with session(Distributed(processes=args.run_processes, restarts=0), "benchmark") as world:
        model, train_data, val_data = model_and_data(args)
        settings = TrainSettings(epochs=1, batch_size=args.batch_size, learning_rate=1e-4, seed=1, progress=None)
        result = train(model, train_data, val_data, 0, settings, world=world)
        if world.main:
            Path(args.result).write_text(json.dumps({"losses": result.losses, "train_seconds": result.seconds,
                                                     "steps": result.steps, "val_accuracy": result.best_accuracy}))


def run(args: argparse.Namespace, processes: int, result: Path) -> dict:
    command = [sys.executable, __file__, "--run-processes", str(processes), "--result", str(result),
               "--examples", str(args.examples), "--batch-size", str(args.batch_size), "--layers", str(args.layers),
               "--hidden", str(args.hidden)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    return {**json.loads(result.read_text()), "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=1088)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--run-processes", type=int, help=argparse.SUPPRESS)  # a run of the benchmark (a worker)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_processes:
        worker(args)
        return
    runs: dict[int, list[dict]] = {p: [] for p in args.processes}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for processes in args.processes:  # interleaved: a slow spell of the machine hits every count alike
                runs[processes].append(run(args, processes, Path(scratch) / f"{processes}-{round_}.json"))
                print(f"round {round_ + 1}: {processes} process(es) {runs[processes][-1]['wall_seconds']:.1f} s",
                      flush=True)
    base = args.processes[0]
    summary = {}
    for processes, done in runs.items():
        losses = np.array(done[0]["losses"])
        summary[str(processes)] = {
            "wall_seconds_median": round(statistics.median(r["wall_seconds"] for r in done), 2),
            "train_seconds_median": round(statistics.median(r["train_seconds"] for r in done), 2),
            "steps": done[0]["steps"],
            "val_accuracy": done[0]["val_accuracy"],
            "max_abs_loss_diff_vs_1": float(np.abs(losses - np.array(runs[base][0]["losses"])).max()),
        }
    for processes in args.processes:
        entry = summary[str(processes)]
        entry["train_time_ratio_vs_1"] = round(entry["train_seconds_median"]
                                               / summary[str(base)]["train_seconds_median"], 3)
        entry["wall_time_ratio_vs_1"] = round(entry["wall_seconds_median"] / summary[str(base)]["wall_seconds_median"],
                                              3)
    result = {
        "what": "training.train on 1 vs N processes (torchrun; gloo on CPU, nccl on GPU) at the same global batch",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
        "config": {k: getattr(args, k) for k in ("examples", "batch_size", "layers", "hidden", "rounds")},
        "summary": summary,
        "rounds": {str(p): [{k: r[k] for k in ("wall_seconds", "train_seconds")} for r in done]
                   for p, done in runs.items()},
    }
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

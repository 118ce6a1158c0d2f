"""Length-grouped batches vs random batches: padded tokens per epoch and training speed, side by side.

    python benchmarks/padding_benchmark.py [--model models/teacher] [--steps 30]

Both arms train the same model from the same weights on the same training split, with the same
batch size; only the batch composition differs. Prints medians over `--repeats` timed runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from distilops.pipeline.batching import length_grouped_batches, make_collate, tokenize
from distilops.pipeline.data import read_split
from distilops.pipeline.modeling import load_classifier, load_tokenizer
from distilops.pipeline.training import cross_entropy_loss


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def time_steps(model, data, batches, pad_id: int, steps: int) -> float:
    """Seconds per training step (forward, backward, AdamW) over the first `steps` batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collate = make_collate(pad_id)
    model.train()
    start = time.perf_counter()
    for batch_ids in batches[:steps]:
        loss = cross_entropy_loss(model, collate([data[i] for i in batch_ids]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/teacher", help="model folder (or catalogue name) to train")
    parser.add_argument("--data", default="data/prepared", help="folder holding train.parquet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per arm and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/padding.json")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    frame = read_split("train", args.data)
    data = tokenize(tokenizer, frame["text"], frame["label"], args.max_length)
    lengths = [len(ids) for ids in data.input_ids]
    grouped = length_grouped_batches(lengths, args.batch_size, seed=0)
    order = np.random.default_rng(0).permutation(len(data))
    random_batches = [order[i: i + args.batch_size].tolist() for i in range(0, len(order), args.batch_size)]

    state = load_classifier(args.model).state_dict()
    timings: dict[str, list[float]] = {"random": [], "grouped": []}
    for _ in range(args.repeats):
        for arm, batches in (("random", random_batches), ("grouped", grouped)):  # interleaved: fair to noise
            model = load_classifier(args.model)
            model.load_state_dict(state)
            timings[arm].append(time_steps(model, data, batches, tokenizer.pad_token_id, args.steps))

    real_tokens = sum(lengths)
    result = {
        "model": args.model, "examples": len(data), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "real_tokens": real_tokens,
        "padded_tokens_random": padded_tokens(random_batches, lengths),
        "padded_tokens_grouped": padded_tokens(grouped, lengths),
        "seconds_per_step_random_median": statistics.median(timings["random"]),
        "seconds_per_step_grouped_median": statistics.median(timings["grouped"]),
    }
    result["padding_overhead_random"] = result["padded_tokens_random"] / real_tokens - 1
    result["padding_overhead_grouped"] = result["padded_tokens_grouped"] / real_tokens - 1
    result["speedup_grouped_vs_random"] = (result["seconds_per_step_random_median"]
                                           / result["seconds_per_step_grouped_median"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

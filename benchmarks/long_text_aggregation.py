"""Long texts: reading only the first window vs every window, and how to combine the windows.

On the long-text set (data/prepared/test_long.parquet, built by the long_texts stage), for the teacher
and the served ONNX int8 student: accuracy when only the first 64-token window is read (what the
service did before) and with every window combined by (a) the mean of logits (what ships), (b) the
mean of probabilities, (c) the most confident window; each with its bootstrap 95% interval. Also the
cost: batch-1 latency of a long text against a short test text (medians, interleaved).

    python benchmarks/long_text_aggregation.py --out benchmarks/results/long_text_aggregation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from distilops.pipeline.torch_model import open_classifier
from distilops.serving.inference import softmax
from distilops.stats import accuracy_interval, bootstrap_indices

RULES = {
    "mean_logits": lambda logits: logits.mean(axis=0),
    "mean_probabilities": lambda logits: softmax(logits).mean(axis=0),
    "most_confident_window": lambda logits: logits[np.abs(logits[:, 1] - logits[:, 0]).argmax()],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["models/teacher", "models/quantized/onnx_int8"])
    parser.add_argument("--data", default="data/prepared", help="folder holding test.parquet and test_long.parquet")
    parser.add_argument("--out", default="benchmarks/results/long_text_aggregation.json")
    args = parser.parse_args()
    long_set = pd.read_parquet(Path(args.data) / "test_long.parquet")
    short = pd.read_parquet(Path(args.data) / "test.parquet")["text"].tolist()[:73]
    texts = long_set["text"].tolist()
    results: dict = {"texts": len(texts), "models": {}}
    for folder in args.models:
        model = open_classifier(folder, threads=2)
        gold = long_set["label"].map({name: i for i, name in enumerate(model.labels)}).to_numpy()
        indices = bootstrap_indices(len(gold), 1000, seed=0)
        entry: dict = {}
        first = open_classifier(folder, threads=2, max_windows=1).predict_logits_batched(texts).argmax(-1)
        entry["first_window_only"] = {"accuracy": float((first == gold).mean()),
                                      "accuracy_ci": list(accuracy_interval(first == gold, indices))}
        logits, windows = model.predict_windows(texts)
        entry["windows_per_text"] = sum(windows.windows_per_text) / len(texts)
        for rule, combine in RULES.items():
            preds = np.array([combine(logits[s:e]).argmax() for s, e in windows.spans])
            entry[rule] = {"accuracy": float((preds == gold).mean()),
                           "accuracy_ci": list(accuracy_interval(preds == gold, indices))}
        timings: dict[str, list[float]] = {"long": [], "short": []}
        for _ in range(3):  # interleaved: noise falls on both alike
            for kind, batch in (("long", texts), ("short", short)):
                for text in batch:
                    start = time.perf_counter()
                    model.predict_logits([text])
                    timings[kind].append((time.perf_counter() - start) * 1000)
        entry["latency_p50_ms"] = {k: statistics.median(v) for k, v in timings.items()}
        entry["long_vs_short_latency"] = entry["latency_p50_ms"]["long"] / entry["latency_p50_ms"]["short"]
        entry["latency_per_window_vs_short_text"] = entry["long_vs_short_latency"] / entry["windows_per_text"]
        results["models"][folder] = entry
        print(folder, json.dumps(entry, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

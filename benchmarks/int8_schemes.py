"""Static vs dynamic ONNX Runtime int8, side by side in one run: which should CPU nodes serve?

    python benchmarks/int8_schemes.py          # after `make run` (models/student, models/teacher, data/prepared)

Both variants are built here from the same fp32 student (`pipeline/quantize.build`, the quantize stage's code:
onnx_int8 dynamic, onnx_int8_static calibrated on `--calibration-texts` training texts) and measured by the
evaluate stage's own code (`pipeline/evaluate.run`) in one process, models interleaved in every timed repeat:
test accuracy [95%], agreement with the teacher on test and on general English [95%], batch-1 p50, batch-32
throughput, size. Plus what the scheme is about: how many test labels change between batch 1 and batch 64.

Without a teacher folder (`--teacher ''`) the fp32 student is the reference: agreement then reads "with the fp32
model it was quantized from".
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from distilops.config import EvaluateConfig
from distilops.pipeline.data import read_labels
from distilops.pipeline.evaluate import BASELINE, TextSet, run
from distilops.pipeline.quantize import Calibration, build
from distilops.pipeline.torch_model import open_classifier
from distilops.pipeline.transfer import unlabeled_texts
from distilops.serving.inference import TextClassifier

SCHEMES = ("onnx_int8", "onnx_int8_static")


def label_changes(folder: Path, texts: list[str], batch_size: int, **windows: int) -> float:
    """Share of texts whose label at batch `batch_size` differs from their label alone (batch 1)."""
    model = TextClassifier(folder, device="cpu", **windows)
    alone = np.concatenate([model.predict_logits([text]) for text in texts]).argmax(-1)
    return float((model.predict_logits_batched(texts, batch_size).argmax(-1) != alone).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="models/student", help="fp32 student folder")
    parser.add_argument("--teacher", default="models/teacher", help="teacher folder ('' = the fp32 student)")
    parser.add_argument("--data", default="data/prepared", help="train/test .parquet and report.json")
    parser.add_argument("--general-texts", type=int, default=2000, help="general_english texts (0 = none)")
    parser.add_argument("--calibration-texts", type=int, default=512)
    parser.add_argument("--calibration-method", default="minmax", choices=["minmax", "percentile", "entropy"])
    parser.add_argument("--test-texts", type=int, default=0, help="score at most this many test texts (0 = all)")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    parser.add_argument("--window-overlap", type=int, default=16, help="params.yaml's window_overlap")
    parser.add_argument("--max-windows", type=int, default=16, help="params.yaml's max_windows")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="benchmarks/results/int8_schemes_cpu.json")
    args = parser.parse_args()

    data = Path(args.data)
    test = pd.read_parquet(data / "test.parquet")
    if args.test_texts:
        test = test.head(args.test_texts)
    train = pd.read_parquet(data / "train.parquet")
    calibration = train["text"].sample(n=min(args.calibration_texts, len(train)), random_state=args.seed).tolist()
    work = Path(tempfile.mkdtemp(prefix="distilops-int8-"))
    try:
        folders = {BASELINE: Path(args.teacher or args.student)}
        student = open_classifier(args.student, window_overlap=args.window_overlap, max_windows=args.max_windows)
        served = Calibration.served_as(student, calibration, args.calibration_method)  # as the quantize stage
        for variant in SCHEMES:
            folders[f"student_{variant}"] = build(variant, Path(args.student), work, calibration=served)
        unlabeled = ({"general_text": TextSet("general_english",
                                              unlabeled_texts("general_english", args.general_texts, args.seed))}
                     if args.general_texts else {})
        cfg = EvaluateConfig(seed=args.seed, latency_samples=args.latency_samples, repeats=args.repeats,
                             bootstrap_resamples=args.bootstrap, threads=args.threads,
                             window_overlap=args.window_overlap, max_windows=args.max_windows)
        report = run(cfg, folders, test, {}, read_labels(data / "report.json"), unlabeled).report
        texts = test["text"].tolist()
        windows = {"window_overlap": args.window_overlap, "max_windows": args.max_windows}
        changed = {variant: label_changes(folders[f"student_{variant}"], texts, 64, **windows) for variant in SCHEMES}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    throughput = f"throughput_batch{cfg.batch_size}"
    summary = {}
    for variant in SCHEMES:
        m = report["models"][f"student_{variant}"]
        summary[variant] = {
            "test_accuracy": m["accuracy"], "test_accuracy_ci": m["accuracy_ci"],
            "test_agreement_with_teacher": m["agreement_with_teacher"],
            "test_agreement_with_teacher_ci": m["agreement_with_teacher_ci"],
            **{f"{name}_agreement_with_teacher": entry["models"][f"student_{variant}"]["agreement_with_teacher"]
               for name, entry in report["unlabeled_sets"].items()},
            **{f"{name}_agreement_with_teacher_ci": entry["models"][f"student_{variant}"]["agreement_with_teacher_ci"]
               for name, entry in report["unlabeled_sets"].items()},
            "latency_p50_ms": m["latency_p50_ms"], throughput: m[throughput], "size_mb": m["size_mb"],
            "test_labels_changed_batch1_vs_batch64": changed[variant]}
    dynamic, static = summary["onnx_int8"], summary["onnx_int8_static"]
    result = {
        "question": "static (QDQ, calibrated) vs dynamic ONNX Runtime int8 for CPU serving",
        "student": args.student, "reference": args.teacher or f"{args.student} (fp32, no teacher given)",
        "calibration": {"texts": len(calibration), "method": args.calibration_method, "from": "train split"},
        "protocol": {**report["speed_protocol"], "test_texts": len(texts), "intervals": report["intervals"]},
        "hardware": report["hardware"],
        "summary": summary,
        "ratios_static_over_dynamic": {"latency_p50": static["latency_p50_ms"] / dynamic["latency_p50_ms"],
                                       throughput: static[throughput] / dynamic[throughput],
                                       "size": static["size_mb"] / dynamic["size_mb"]},
        "reference_model": {k: report["models"][BASELINE][k] for k in ("accuracy", "accuracy_ci", "latency_p50_ms",
                                                                       throughput, "size_mb")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "ratios": result["ratios_static_over_dynamic"]}, indent=2))


if __name__ == "__main__":
    main()

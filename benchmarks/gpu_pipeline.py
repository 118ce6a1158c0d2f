"""The teacher -> student path on a CUDA GPU (bf16 autocast), with the library's own training code.

For a lent GPU machine that lacks MLflow, DVC and Optuna: fine-tunes a teacher, caches its logits,
builds the half-depth student and distills it with fixed (T, alpha, lr), then times both models.

    PYTHONPATH=src python benchmarks/gpu_pipeline.py --teacher PATH --data data/prepared --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from distilops.pipeline.batching import accuracy, device, model_inputs, predict_logits, tokenize
from distilops.pipeline.data import read_split
from distilops.pipeline.losses import distillation_loss
from distilops.pipeline.modeling import build_student, count_parameters, load_classifier, load_tokenizer
from distilops.pipeline.training import TrainSettings, seed_everything, train


def timed_throughput(model, data, pad_id, batch_size: int, repeats: int = 3) -> float:
    """Median examples per second over `repeats` passes (after one warm-up)."""
    predict_logits(model, data, pad_id, batch_size)
    speeds = []
    for _ in range(repeats):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        start = time.perf_counter()
        predict_logits(model, data, pad_id, batch_size)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        speeds.append(len(data) / (time.perf_counter() - start))
    return float(np.median(speeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="pretrained teacher folder (or hub id online)")
    parser.add_argument("--data", default="data/prepared", help="folder with train/validation/test.parquet")
    parser.add_argument("--epochs", type=int, default=2, help="epochs for teacher and student")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--teacher-lr", type=float, default=3e-5)
    parser.add_argument("--student-lr", type=float, default=1e-4)
    parser.add_argument("--out", default="gpu_pipeline.json", help="where the results JSON goes")
    args = parser.parse_args()

    seed_everything(42)
    dev = device()
    labels = ["rotten", "fresh"]
    tokenizer = load_tokenizer(args.teacher)
    splits = {name: read_split(name, args.data) for name in ("train", "validation", "test")}
    data = {name: tokenize(tokenizer, f["text"], f["label"], args.max_length) for name, f in splits.items()}
    pad = tokenizer.pad_token_id
    results: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__, "teacher_source": args.teacher}

    teacher = load_classifier(args.teacher, labels)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.teacher_lr,
                             progress="teacher")
    fit = train(teacher, data["train"], data["validation"], pad, settings)
    results["teacher"] = {"layers": teacher.config.num_hidden_layers, "parameters": count_parameters(teacher),
                          "val_accuracy": fit.best_accuracy, "train_seconds": round(fit.seconds, 1),
                          "test_accuracy": accuracy(teacher, data["test"], pad)}

    start = time.perf_counter()
    for name in ("train", "validation"):
        data[name].teacher_logits, _ = predict_logits(teacher, data[name], pad, 128)
    results["teacher_outputs_seconds"] = round(time.perf_counter() - start, 1)

    student = build_student(teacher)

    def loss_fn(model, batch):
        out = model(**model_inputs(batch, dev))
        return distillation_loss(out.logits, batch["teacher_logits"].to(dev), batch["labels"].to(dev),
                                 temperature=args.temperature, alpha=args.alpha).total

    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.student_lr,
                             progress="student")
    fit = train(student, data["train"], data["validation"], pad, settings, loss_fn)
    results["student"] = {"layers": student.config.num_hidden_layers, "parameters": count_parameters(student),
                          "val_accuracy": fit.best_accuracy, "train_seconds": round(fit.seconds, 1),
                          "test_accuracy": accuracy(student, data["test"], pad)}
    results["test_accuracy_retention"] = results["student"]["test_accuracy"] / results["teacher"]["test_accuracy"]
    for name, model in (("teacher", teacher), ("student", student)):
        model.eval()
        results[name]["throughput_batch32"] = timed_throughput(model, data["test"], pad, 32)
    results["student_speedup_batch32"] = (results["student"]["throughput_batch32"]
                                          / results["teacher"]["throughput_batch32"])
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

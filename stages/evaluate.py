"""DVC stage `evaluate`: teacher, student and every quantized student on the test split, side by side:
quality (accuracy, macro F1, per-class precision/recall, agreement with the teacher) and cost (size,
parameters, batch-1 latency, batch-32 throughput), each with its ratio to the teacher."""

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import torch

from distilops import paths
from distilops.config import EvaluateConfig, as_flat_dict, load_section
from distilops.data import read_labels, read_split
from distilops.evaluate import (
    classification_metrics,
    hardware,
    measure_speed,
    plot_accuracy_vs_latency,
    plot_confusion_matrices,
    ratios_to_baseline,
    summary_line,
)
from distilops.predict import TextClassifier, read_meta
from distilops.quantize import weights_size_mb
from distilops.stage import run_stage, write_json
from distilops.tracking import stage_run

log = logging.getLogger("evaluate")
METRICS, PLOTS = paths.metrics_file("evaluate"), paths.plots_dir("evaluate")


def model_folders() -> dict[str, Path]:
    """teacher, student, then every quantized variant the quantize stage built (accepted or not)."""
    checks = json.loads(paths.metrics_file("quantize").read_text())
    folders = {"teacher": paths.TEACHER, "student": paths.STUDENT}
    folders.update({f"student_{variant}": paths.QUANTIZED / variant for variant in checks})
    return folders


def main() -> None:
    cfg = load_section(EvaluateConfig)
    threads = cfg.threads or torch.get_num_threads()
    test = read_split("test")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    label_names = read_labels()
    models = {name: TextClassifier(folder, threads=threads) for name, folder in model_folders().items()}

    predictions = {name: model.predict_logits_batched(texts).argmax(-1) for name, model in models.items()}
    results = {
        name: {"format": model.format, **classification_metrics(labels, predictions[name], label_names),
               "agreement_with_teacher": float((predictions[name] == predictions["teacher"]).mean()),
               "size_mb": weights_size_mb(model.folder), "parameters": int(read_meta(model.folder)["parameters"])}
        for name, model in models.items()
    }

    speed_texts = texts[: cfg.speed_texts] if cfg.speed_texts else texts
    speed = measure_speed(models, speed_texts, batch_size=cfg.batch_size, latency_samples=cfg.latency_samples,
                          repeats=cfg.repeats)
    for name in models:
        results[name].update(speed[name])
        if name != "teacher":
            results[name]["vs_teacher"] = ratios_to_baseline(results[name], results["teacher"], cfg.batch_size)

    report = {"test_examples": len(texts), "baseline": "teacher", "hardware": hardware(threads),
              "speed_protocol": {"batch_size": cfg.batch_size, "speed_texts": len(speed_texts),
                                 "latency_samples": cfg.latency_samples, "repeats": cfg.repeats,
                                 "timing": "end to end: tokenization + forward, models interleaved"},
              "models": results}
    write_json(METRICS, report)
    PLOTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": [label_names[i] for i in labels],
                  **{name: [label_names[i] for i in preds] for name, preds in predictions.items()}}
                 ).to_csv(PLOTS / "predictions.csv", index=False)
    pd.DataFrame([{"model": n, "latency_p50_ms": r["latency_p50_ms"], "accuracy": r["accuracy"],
                   "size_mb": r["size_mb"], f"throughput_batch{cfg.batch_size}": r[f"throughput_batch{cfg.batch_size}"]}
                  for n, r in results.items()]).to_csv(PLOTS / "tradeoff.csv", index=False)
    plot_confusion_matrices(results, label_names, PLOTS / "confusion_matrices.png")
    plot_accuracy_vs_latency(results, PLOTS / "accuracy_vs_latency.png")

    with stage_run("evaluate", as_flat_dict(cfg)):
        flat = {f"{name}.{key}": value for name, entry in results.items() for key, value in entry.items()
                if isinstance(value, (int, float))}
        flat.update({f"{name}.vs_teacher.{k}": v for name, entry in results.items()
                     for k, v in entry.get("vs_teacher", {}).items()})
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(METRICS))
        for path in sorted(PLOTS.iterdir()):
            mlflow.log_artifact(str(path), artifact_path="plots")
    log.info("%d test texts; %s, %d threads", len(texts), report["hardware"]["cpu"], threads)
    for name, entry in results.items():
        log.info(summary_line(name, entry, cfg.batch_size))


if __name__ == "__main__":
    run_stage("evaluate", main)

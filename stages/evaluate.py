"""DVC stage `evaluate`: teacher, student and every quantized student side by side, on the test split and
on every set in `evaluate.extra_sets` (by default the long-text set): quality with 95% intervals
(accuracy, macro F1, agreement with the teacher, retention, McNemar vs the teacher) and cost (size,
parameters, batch-1 latency, batch-32 throughput on short and on long texts), with ratios to the teacher.
Long texts are read in windows (`window_overlap`, `max_windows`), as the served model reads them."""

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import torch

from distilops import paths
from distilops.config import EvaluateConfig, as_flat_dict, load_section
from distilops.data import load_eval_set, read_labels, read_split
from distilops.evaluate import (
    classification_metrics,
    hardware,
    measure_set_throughput,
    measure_speed,
    paired_quality,
    plot_accuracy_vs_latency,
    plot_confusion_matrices,
    plot_set_accuracies,
    ratios_to_baseline,
    set_summary_line,
    summary_line,
)
from distilops.predict import TextClassifier, read_meta
from distilops.quantize import weights_size_mb
from distilops.stage import run_stage, write_json
from distilops.tracking import log_dataset, stage_run

log = logging.getLogger("evaluate")
METRICS, PLOTS = paths.metrics_file("evaluate"), paths.plots_dir("evaluate")
LONG_SPEED_TEXTS = 64  # texts of each extra set timed for throughput (long ones cost a window each)


def model_folders() -> dict[str, Path]:
    """teacher, student, then every quantized variant the quantize stage built (accepted or not)."""
    checks = json.loads(paths.metrics_file("quantize").read_text())
    folders = {"teacher": paths.TEACHER, "student": paths.STUDENT}
    folders.update({f"student_{variant}": paths.QUANTIZED / variant for variant in checks})
    return folders


def main() -> None:
    cfg = load_section(EvaluateConfig)
    threads = cfg.threads or torch.get_num_threads()
    label_names = read_labels()
    test = read_split("test")
    extra = {spec.name: load_eval_set(spec, label_names, cfg.seed) for spec in cfg.extra_sets}  # bad sets fail first
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    models = {name: TextClassifier(folder, threads=threads, window_overlap=cfg.window_overlap,
                                   max_windows=cfg.max_windows) for name, folder in model_folders().items()}

    predictions = {name: model.predict_logits_batched(texts).argmax(-1) for name, model in models.items()}
    quality = paired_quality(labels, predictions, label_names, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    results = {
        name: {"format": model.format, **classification_metrics(labels, predictions[name], label_names),
               **quality[name], "size_mb": weights_size_mb(model.folder),
               "parameters": int(read_meta(model.folder)["parameters"])}
        for name, model in models.items()
    }
    sets = {}
    for k, (set_name, frame) in enumerate(extra.items(), start=1):
        set_texts = frame["text"].tolist()
        windows = models["teacher"].encode(set_texts)
        set_predictions = {name: model.predict_logits_batched(set_texts).argmax(-1) for name, model in models.items()}
        sets[set_name] = {
            "examples": len(frame), "windows_mean": sum(windows.windows_per_text) / len(frame),
            "truncated_fraction": sum(windows.truncated) / len(frame),
            "models": paired_quality(frame["label"].to_numpy(), set_predictions, label_names,
                                     resamples=cfg.bootstrap_resamples, seed=cfg.seed + k)}

    speed_texts = texts[: cfg.speed_texts] if cfg.speed_texts else texts
    speed = measure_speed(models, speed_texts, batch_size=cfg.batch_size, latency_samples=cfg.latency_samples,
                          repeats=cfg.repeats)
    for set_name, frame in extra.items():
        timed = frame["text"].tolist()[:LONG_SPEED_TEXTS]
        for name, rate in measure_set_throughput(models, timed, batch_size=cfg.batch_size,
                                                 repeats=cfg.repeats).items():
            entry = sets[set_name]["models"][name]
            entry[f"throughput_batch{cfg.batch_size}"] = rate
            # what one window costs next to one short test text: the price the window cap bounds
            entry["window_cost_vs_short_text"] = (speed[name][f"throughput_batch{cfg.batch_size}"]
                                                  / (rate * sets[set_name]["windows_mean"]))
    for name in models:
        results[name].update(speed[name])
        if name != "teacher":
            results[name]["vs_teacher"] = ratios_to_baseline(results[name], results["teacher"], cfg.batch_size)

    report = {"test_examples": len(texts), "baseline": "teacher", "hardware": hardware(threads),
              "windows": {"max_length": models["teacher"].max_length, "window_overlap": cfg.window_overlap,
                          "max_windows": cfg.max_windows, "aggregation": "mean of logits"},
              "intervals": {"level": 0.95, "method": "percentile bootstrap over texts, paired across models",
                            "resamples": cfg.bootstrap_resamples},
              "speed_protocol": {"batch_size": cfg.batch_size, "speed_texts": len(speed_texts),
                                 "latency_samples": cfg.latency_samples, "repeats": cfg.repeats,
                                 "timing": "end to end: tokenization + forward, models interleaved"},
              "models": results, "sets": sets}
    write_json(METRICS, report)
    write_plots(results, sets, labels, predictions, label_names, cfg.batch_size)
    with stage_run("evaluate", as_flat_dict(cfg)):
        log_dataset(test, "test", paths.PREPARED / "test.parquet", "evaluation")
        for spec in cfg.extra_sets:
            log_dataset(extra[spec.name], spec.name, spec.source, "evaluation")
        flat = {f"{name}.{key}": value for name, entry in results.items() for key, value in entry.items()
                if isinstance(value, (int, float))}
        flat.update({f"{name}.vs_teacher.{k}": v for name, entry in results.items()
                     for k, v in entry.get("vs_teacher", {}).items()})
        # test split: `<model>.<metric>`; extra sets: `<set>.<model>.<metric>`; intervals as _low/_high
        for prefix, models_of_set in [("", results), *((f"{n}.", e["models"]) for n, e in sets.items())]:
            for name, m in models_of_set.items():
                if prefix:
                    flat.update({f"{prefix}{name}.{k}": v for k, v in m.items() if isinstance(v, (int, float))})
                for key in ("accuracy", "retention"):
                    if f"{key}_ci" in m:
                        flat[f"{prefix}{name}.{key}_low"], flat[f"{prefix}{name}.{key}_high"] = m[f"{key}_ci"]
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(METRICS))
        for path in sorted(PLOTS.iterdir()):
            mlflow.log_artifact(str(path), artifact_path="plots")
    log.info("%d test texts; %s, %d threads", len(texts), report["hardware"]["cpu"], threads)
    for name, entry in results.items():
        log.info(summary_line(name, entry, cfg.batch_size))
    for set_name, entry in sets.items():
        log.info("%s: %d texts, %.1f windows per text, %.0f%% cut by the window cap", set_name, entry["examples"],
                 entry["windows_mean"], 100 * entry["truncated_fraction"])
        for name, m in entry["models"].items():
            log.info(set_summary_line(set_name, name, m))


def write_plots(results: dict, sets: dict, labels, predictions: dict, label_names: list[str], batch_size: int) -> None:
    PLOTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": [label_names[i] for i in labels],
                  **{name: [label_names[i] for i in preds] for name, preds in predictions.items()}}
                 ).to_csv(PLOTS / "predictions.csv", index=False)
    pd.DataFrame([{"model": n, "latency_p50_ms": r["latency_p50_ms"], "accuracy": r["accuracy"],
                   "size_mb": r["size_mb"], f"throughput_batch{batch_size}": r[f"throughput_batch{batch_size}"]}
                  for n, r in results.items()]).to_csv(PLOTS / "tradeoff.csv", index=False)
    rows = [{"set": set_name, "model": name, "set_model": f"{set_name}/{name}", "accuracy": m["accuracy"],
             "accuracy_low": m["accuracy_ci"][0], "accuracy_high": m["accuracy_ci"][1],
             "agreement_with_teacher": m["agreement_with_teacher"]}
            for set_name, entry in [("test", {"models": results}), *sets.items()]
            for name, m in entry["models"].items()]
    pd.DataFrame(rows).to_csv(PLOTS / "sets.csv", index=False)
    plot_confusion_matrices(results, label_names, PLOTS / "confusion_matrices.png")
    plot_accuracy_vs_latency(results, PLOTS / "accuracy_vs_latency.png")
    plot_set_accuracies(rows, PLOTS / "set_accuracies.png")


if __name__ == "__main__":
    run_stage("evaluate", main)

"""Side-by-side evaluation of teacher, student and quantized students on the test split and on any
extra evaluation sets (e.g. the long-text set).

Quality: accuracy with its bootstrap 95% interval, macro F1, per-class precision/recall, agreement
with the teacher (paired interval), retention (accuracy / the teacher's, paired interval) and an exact
McNemar test against the teacher, per set (see stats.py for why intervals).
Label-free fidelity: on each unlabelled set (by default general text held apart from transfer training; or
any file, e.g. logged requests), each model's agreement with the teacher, with its paired interval: no
labels needed, so it can be measured where users' traffic lives.
Reference: for each ONNX student (what a pod may serve), its predictions on the test split described as
serving/fidelity.py cuts them (label mix, confidence, words, windows, agreement with the teacher); the
register stage stores it in the version's model folder and the service measures drift against it.
Cost: weights on disk, parameters, batch-1 latency (median and p95) and batch-32 throughput,
measured end to end (tokenization included) through the same `TextClassifier` the service uses.
Speed is measured in one process, models interleaved within each repeat, so machine noise
falls on all of them alike; every figure is also given as a ratio to the teacher's.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from tqdm.auto import tqdm

from distilops import paths, stats
from distilops.config import QUANTIZE_VARIANTS, EvaluateConfig
from distilops.pipeline.quantize import weights_size_mb
from distilops.pipeline.torch_model import open_classifier
from distilops.serving import fidelity
from distilops.serving.folder import read_meta
from distilops.serving.inference import TextClassifier, softmax

log = logging.getLogger(__name__)
BASELINE = "teacher"
SET_SPEED_TEXTS = 64  # texts of each extra set timed for throughput (long ones cost a window each)
REFERENCE_SPLIT = "test"  # the split each serving candidate's reference describes
ENCODE_BATCH = 256  # texts tokenized at a time when counting windows


def model_key(variant: str) -> str:
    """A model's name in the evaluation report (metrics/evaluate.json), its plots and dvc.yaml's plot keys:
    "teacher", "student", "student_<variant>" for each quantized variant."""
    return variant if variant in (BASELINE, "student") else f"student_{variant}"


def model_folders(quantized: dict) -> dict[str, Path]:
    """teacher, student, then every variant the quantize stage built (its report `quantized`, accepted or not;
    the report's teacher_onnx entry is the teacher's export, not a student variant)."""
    folders = {BASELINE: paths.TEACHER, "student": paths.STUDENT}
    folders.update({model_key(variant): paths.QUANTIZED / variant for variant in quantized
                    if variant in QUANTIZE_VARIANTS})
    return folders


def serving_candidates(models: dict[str, TextClassifier]) -> list[str]:
    """The models a pod may serve: every ONNX student (the serving image runs ONNX only)."""
    return [name for name, model in models.items() if name != BASELINE and model.format == "onnx"]


def windows_per_text(model: TextClassifier, texts: Sequence[str], batch_size: int = ENCODE_BATCH) -> list[int]:
    """The windows `model` reads each text in: its tokenizer alone, no model runs."""
    return [n for i in range(0, len(texts), batch_size)
            for n in model.encode(texts[i: i + batch_size]).windows_per_text]


def reference_of(model: TextClassifier, logits: np.ndarray, texts: Sequence[str], quality: dict) -> dict:
    """What the service compares its traffic against (serving/fidelity.py): `model`'s answers on the test
    split, from the logits already computed (its score is the softmax's max, as the service answers), the
    texts' length and windows, and its agreement with the teacher with its interval (`quality`)."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    return fidelity.reference(
        predicted=[model.labels[i] for i in probs.argmax(-1)], confidence=probs.max(-1).tolist(),
        words=[fidelity.word_count(t) for t in texts], windows=windows_per_text(model, texts), labels=model.labels,
        agreement=quality["agreement_with_teacher"], agreement_ci=tuple(quality["agreement_with_teacher_ci"]),
        split=REFERENCE_SPLIT)


@dataclass
class TextSet:
    source: str  # where the texts came from: 'general_english' (its held-apart slice) or a file
    texts: list[str]


@dataclass
class Evaluation:
    report: dict  # what metrics/evaluate.json holds
    labels: np.ndarray  # the test split's label ids
    predictions: dict[str, np.ndarray]  # each model's predicted label ids on the test split


def run(cfg: EvaluateConfig, folders: dict[str, Path], test: pd.DataFrame, extra: dict[str, pd.DataFrame],
        label_names: list[str], unlabeled: dict[str, TextSet] | None = None) -> Evaluation:
    """Every model in `folders` on the test split and every extra set: quality with paired intervals; on every
    unlabelled set, agreement with the teacher; then cost (size, parameters, latency, throughput) with ratios
    to the teacher. Long texts are read in the configured windows, as the served model reads them."""
    threads = cfg.threads or torch.get_num_threads()
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    models = {name: open_classifier(folder, threads=threads, window_overlap=cfg.window_overlap,
                                    max_windows=cfg.max_windows) for name, folder in folders.items()}

    # Each model reads the test split once: predictions, intervals and the serving reference share these logits.
    logits = {name: model.predict_logits_batched(texts) for name, model in models.items()}
    predictions = {name: values.argmax(-1) for name, values in logits.items()}
    quality = paired_quality(labels, predictions, label_names, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    results = {
        name: {"format": model.format, **{k: quality[name][k] for k in ("accuracy", "macro_f1")},
               **class_breakdown(labels, predictions[name], label_names), **quality[name],
               "size_mb": weights_size_mb(model.folder),
               "parameters": int(read_meta(model.folder)["parameters"]),
               # which test texts it got right, packed: the registry's paired no-regression gate reads it
               "test_correct": stats.pack_correct(predictions[name] == labels)}
        for name, model in models.items()
    }
    for name in serving_candidates(models):
        results[name]["reference"] = reference_of(models[name], logits[name], texts, quality[name])
    sets = {}
    for k, (set_name, frame) in enumerate(extra.items(), start=1):
        set_texts = frame["text"].tolist()
        windows = models[BASELINE].encode(set_texts)
        set_predictions = {name: model.predict_logits_batched(set_texts).argmax(-1) for name, model in models.items()}
        sets[set_name] = {
            "examples": len(frame), "windows_mean": sum(windows.windows_per_text) / len(frame),
            "truncated_fraction": sum(windows.truncated) / len(frame),
            "models": paired_quality(frame["label"].to_numpy(), set_predictions, label_names,
                                     resamples=cfg.bootstrap_resamples, seed=cfg.seed + k)}
    unlabeled_sets = {name: unlabeled_agreement(models, found, resamples=cfg.bootstrap_resamples,
                                                seed=cfg.seed + len(extra) + k)
                      for k, (name, found) in enumerate((unlabeled or {}).items(), start=1)}

    speed_texts = texts[: cfg.speed_texts] if cfg.speed_texts else texts
    speed = measure_speed(models, speed_texts, batch_size=cfg.batch_size, latency_samples=cfg.latency_samples,
                          repeats=cfg.repeats)
    throughput = f"throughput_batch{cfg.batch_size}"
    for set_name, frame in extra.items():
        timed = frame["text"].tolist()[:SET_SPEED_TEXTS]
        for name, rate in measure_set_throughput(models, timed, batch_size=cfg.batch_size,
                                                 repeats=cfg.repeats).items():
            entry = sets[set_name]["models"][name]
            entry[throughput] = rate
            # what one window costs next to one short test text: the price the window cap bounds
            entry["window_cost_vs_short_text"] = speed[name][throughput] / (rate * sets[set_name]["windows_mean"])
    for name in models:
        results[name].update(speed[name])
        if name != BASELINE:
            results[name]["vs_teacher"] = ratios_to_baseline(results[name], results[BASELINE], cfg.batch_size)

    report = {"test_examples": len(texts), "baseline": BASELINE, "hardware": hardware(threads),
              "windows": {"max_length": models[BASELINE].max_length, "window_overlap": cfg.window_overlap,
                          "max_windows": cfg.max_windows, "aggregation": "mean of logits"},
              "intervals": {"level": 0.95, "method": "percentile bootstrap over texts, paired across models",
                            "resamples": cfg.bootstrap_resamples},
              "speed_protocol": {"batch_size": cfg.batch_size, "speed_texts": len(speed_texts),
                                 "latency_samples": cfg.latency_samples, "repeats": cfg.repeats,
                                 "timing": "end to end: tokenization + forward, models interleaved"},
              "models": results, "sets": sets, "unlabeled_sets": unlabeled_sets}
    return Evaluation(report, labels, predictions)


def unlabeled_agreement(models: dict[str, TextClassifier], found: TextSet, *, resamples: int, seed: int) -> dict:
    """One unlabelled set: each model reads it once; its agreement with the teacher, with an interval from
    draws shared by every model (the teacher's own is 1.0 [1.0, 1.0]: the reference)."""
    predictions = {name: model.predict_logits_batched(found.texts).argmax(-1) for name, model in models.items()}
    indices = stats.bootstrap_indices(len(found.texts), resamples, seed)
    return {"texts": len(found.texts), "source": found.source,
            "models": {name: agreement(preds, predictions[BASELINE], indices) for name, preds in predictions.items()}}


def agreement(predictions: np.ndarray, teacher: np.ndarray, indices: np.ndarray) -> dict:
    """How often a model gives the teacher's label, and its interval over the resampled texts `indices`."""
    return {"agreement_with_teacher": stats.agreement(predictions, teacher),
            # "correct" against the teacher's label, resampled as accuracy is
            "agreement_with_teacher_ci": list(stats.accuracy_interval(predictions == teacher, indices))}


def flat_metrics(report: dict) -> dict[str, float]:
    """The report as MLflow metrics: test split `<model>.<metric>`, extra and unlabelled sets
    `<set>.<model>.<metric>`, ratios `<model>.vs_teacher.<ratio>`, intervals as `_low`/`_high`."""
    results, sets = report["models"], report["sets"]
    flat = {f"{name}.{key}": value for name, entry in results.items() for key, value in entry.items()
            if isinstance(value, (int, float))}
    flat.update({f"{name}.vs_teacher.{k}": v for name, entry in results.items()
                 for k, v in entry.get("vs_teacher", {}).items()})
    for prefix, models_of_set in [("", results), *((f"{n}.", e["models"]) for n, e in sets.items())]:
        for name, m in models_of_set.items():
            if prefix:
                flat.update({f"{prefix}{name}.{k}": v for k, v in m.items() if isinstance(v, (int, float))})
            for key in ("accuracy", "retention", "agreement_with_teacher"):
                if f"{key}_ci" in m:
                    flat[f"{prefix}{name}.{key}_low"], flat[f"{prefix}{name}.{key}_high"] = m[f"{key}_ci"]
    for set_name, entry in report.get("unlabeled_sets", {}).items():
        for name, m in entry["models"].items():
            key = f"{set_name}.{name}.agreement_with_teacher"
            flat[key] = m["agreement_with_teacher"]
            flat[f"{key}_low"], flat[f"{key}_high"] = m["agreement_with_teacher_ci"]
    return flat


def log_summary(report: dict) -> None:
    """One line per model, then per extra set and model: what the stage prints."""
    batch_size = report["speed_protocol"]["batch_size"]
    log.info("%d test texts; %s, %d threads", report["test_examples"], report["hardware"]["cpu"],
             report["hardware"]["threads"])
    for name, entry in report["models"].items():
        log.info(summary_line(name, entry, batch_size))
    for set_name, entry in report["sets"].items():
        log.info("%s: %d texts, %.1f windows per text, %.0f%% cut by the window cap", set_name, entry["examples"],
                 entry["windows_mean"], 100 * entry["truncated_fraction"])
        for name, m in entry["models"].items():
            log.info(set_summary_line(set_name, name, m))
    for set_name, entry in report.get("unlabeled_sets", {}).items():
        log.info(unlabeled_summary_line(set_name, entry))


def write_plots(evaluation: Evaluation, label_names: list[str], folder: Path) -> None:
    """The DVC plots (predictions, trade-off and per-set CSVs) and their PNG renderings."""
    results, sets = evaluation.report["models"], evaluation.report["sets"]
    batch_size = evaluation.report["speed_protocol"]["batch_size"]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": [label_names[i] for i in evaluation.labels],
                  **{name: [label_names[i] for i in preds] for name, preds in evaluation.predictions.items()}}
                 ).to_csv(folder / "predictions.csv", index=False)
    pd.DataFrame([{"model": n, "latency_p50_ms": r["latency_p50_ms"], "accuracy": r["accuracy"],
                   "size_mb": r["size_mb"], f"throughput_batch{batch_size}": r[f"throughput_batch{batch_size}"]}
                  for n, r in results.items()]).to_csv(folder / "tradeoff.csv", index=False)
    rows = [{"set": set_name, "model": name, "set_model": f"{set_name}/{name}", "accuracy": m["accuracy"],
             "accuracy_low": m["accuracy_ci"][0], "accuracy_high": m["accuracy_ci"][1],
             "agreement_with_teacher": m["agreement_with_teacher"]}
            for set_name, entry in [("test", {"models": results}), *sets.items()]
            for name, m in entry["models"].items()]
    pd.DataFrame(rows).to_csv(folder / "sets.csv", index=False)
    plot_confusion_matrices(results, label_names, folder / "confusion_matrices.png")
    plot_accuracy_vs_latency(results, folder / "accuracy_vs_latency.png")
    plot_set_accuracies(rows, folder / "set_accuracies.png")


def class_breakdown(labels: np.ndarray, predictions: np.ndarray, label_names: Sequence[str]) -> dict:
    """Per-class precision, recall, F1 and support, and the confusion matrix (accuracy and macro F1, with their
    intervals: paired_quality)."""
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=ids,
                                                                     zero_division=0)
    return {
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(threads: int) -> dict:
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _throughput(model: TextClassifier, texts: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        model.predict_logits(texts[i: i + batch_size])
    return len(texts) / (time.perf_counter() - start)


def _latencies_ms(model: TextClassifier, texts: list[str]) -> list[float]:
    out = []
    for text in texts:
        start = time.perf_counter()
        model.predict_logits([text])
        out.append((time.perf_counter() - start) * 1000)
    return out


def measure_speed(models: dict[str, TextClassifier], texts: list[str], *, batch_size: int = 32,
                  latency_samples: int = 200, repeats: int = 3, progress: bool = True) -> dict[str, dict]:
    """Median batch throughput and pooled batch-1 latency percentiles per model, interleaved."""
    latency_texts = texts[:latency_samples]
    for model in models.values():  # warm-up: first calls allocate and pick kernels
        _throughput(model, texts[: batch_size * 2], batch_size)
        _latencies_ms(model, latency_texts[:10])
    throughput: dict[str, list[float]] = {name: [] for name in models}
    latency: dict[str, list[float]] = {name: [] for name in models}
    bar = tqdm(total=repeats * len(models), desc="speed", unit="model", disable=not progress)
    for _ in range(repeats):
        for name, model in models.items():
            throughput[name].append(_throughput(model, texts, batch_size))
            latency[name] += _latencies_ms(model, latency_texts)
            bar.update(1)
    bar.close()
    return {
        name: {
            f"throughput_batch{batch_size}": statistics.median(throughput[name]),
            "latency_p50_ms": float(np.percentile(latency[name], 50)),
            "latency_p95_ms": float(np.percentile(latency[name], 95)),
        }
        for name in models
    }


def paired_quality(labels: np.ndarray, predictions: dict[str, np.ndarray], label_names: Sequence[str], *,
                   resamples: int, seed: int, baseline: str = "teacher") -> dict[str, dict]:
    """Per model, on one set: accuracy and its 95% interval, macro F1, agreement with the baseline (interval) and,
    against the baseline on the same resampled texts, retention with its interval and McNemar's test."""
    indices = stats.bootstrap_indices(len(labels), resamples, seed)
    correct = {name: preds == labels for name, preds in predictions.items()}
    ids = list(range(len(label_names)))
    out = {}
    for name, preds in predictions.items():
        entry = {"accuracy": float(correct[name].mean()),
                 "accuracy_ci": list(stats.accuracy_interval(correct[name], indices)),
                 "macro_f1": float(f1_score(labels, preds, labels=ids, average="macro", zero_division=0)),
                 **agreement(preds, predictions[baseline], indices)}  # the same texts resampled for every model
        if name != baseline:
            base_accuracy = correct[baseline].mean()
            test = stats.mcnemar(correct[name], correct[baseline])
            entry.update({
                "retention": stats.retention(entry["accuracy"], base_accuracy),
                "retention_ci": list(stats.retention_interval(correct[name], correct[baseline], indices)),
                "mcnemar_vs_teacher": {"model_only_right": test["a_only"], "teacher_only_right": test["b_only"],
                                       "p_value": test["p_value"]}})
        out[name] = entry
    return out


def ratios_to_baseline(entry: dict, baseline: dict, batch_size: int = 32) -> dict:
    """The DistilBERT-style claim in numbers: how much of the baseline's accuracy, how much faster, how small."""
    key = f"throughput_batch{batch_size}"
    return {
        "accuracy_retention": stats.retention(entry["accuracy"], baseline["accuracy"]),
        "accuracy_points": 100 * (entry["accuracy"] - baseline["accuracy"]),
        "throughput_speedup": entry[key] / baseline[key],
        "latency_p50_speedup": baseline["latency_p50_ms"] / entry["latency_p50_ms"],
        "latency_p95_speedup": baseline["latency_p95_ms"] / entry["latency_p95_ms"],
        "size_fraction": entry["size_mb"] / baseline["size_mb"],
        "parameter_fraction": entry["parameters"] / baseline["parameters"] if baseline["parameters"] else None,
    }


def interval(entry: dict, key: str = "accuracy", percent: bool = False) -> str:
    low, high = entry[f"{key}_ci"]
    return f"{entry[key]:.1%} [{low:.1%}, {high:.1%}]" if percent else f"{entry[key]:.4f} [{low:.3f}, {high:.3f}]"


def summary_line(name: str, entry: dict, batch_size: int = 32) -> str:
    vs = entry.get("vs_teacher")
    text = (f"{name:18s} acc {interval(entry)}  f1 {entry['macro_f1']:.4f}  "
            f"{entry[f'throughput_batch{batch_size}']:7.1f} texts/s  p50 {entry['latency_p50_ms']:6.2f} ms  "
            f"{entry['size_mb']:6.1f} MB")
    if vs:
        text += (f"  | vs teacher: {interval(entry, 'retention', percent=True)} acc, "
                 f"McNemar p {entry['mcnemar_vs_teacher']['p_value']:.2f}, {vs['throughput_speedup']:.2f}x "
                 f"throughput, {vs['latency_p50_speedup']:.2f}x faster p50, {vs['size_fraction']:.0%} size")
    return text


def set_summary_line(set_name: str, name: str, entry: dict) -> str:
    text = (f"{set_name:14s} {name:18s} acc {interval(entry)}  "
            f"agreement {interval(entry, 'agreement_with_teacher', percent=True)}")
    if "retention" in entry:
        text += f"  retention {interval(entry, 'retention', percent=True)}"
    return text


def unlabeled_summary_line(set_name: str, entry: dict) -> str:
    """`general_text: 2000 unlabelled texts (general_english), agreement with teacher: student 89.4% [...], ...`"""
    agreements = ", ".join(f"{name} {interval(m, 'agreement_with_teacher', percent=True)}"
                           for name, m in entry["models"].items() if name != BASELINE)
    return f"{set_name}: {entry['texts']} unlabelled texts ({entry['source']}), agreement with teacher: {agreements}"


def measure_set_throughput(models: dict[str, TextClassifier], texts: list[str], *, batch_size: int,
                           repeats: int) -> dict[str, float]:
    """Median texts per second on `texts` (long ones read in windows), models interleaved."""
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            speeds[name].append(_throughput(model, texts, batch_size))
    return {name: statistics.median(values) for name, values in speeds.items()}


def plot_confusion_matrices(results: dict[str, dict], label_names: Sequence[str], path) -> Figure:
    """One confusion matrix per model, side by side, as a PNG; returns the figure."""
    fig = Figure(figsize=(3.2 * len(results), 3.4))  # no pyplot: no global figure state, no GUI backend
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (name, entry) in zip(axes[0], results.items(), strict=True):
        matrix = np.asarray(entry["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(label_names)), label_names)
        ax.set_yticks(range(len(label_names)), label_names)
        ax.set_xlabel("predicted")
        ax.set_title(f"{name}\nacc {entry['accuracy']:.3f}", fontsize=9)
    axes[0][0].set_ylabel("actual")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot_accuracy_vs_latency(results: dict[str, dict], path) -> Figure:
    """Test accuracy against batch-1 median latency (log scale): the distillation trade-off; returns the figure."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ordered = sorted(results.items(), key=lambda item: item[1]["latency_p50_ms"])
    for k, (name, entry) in enumerate(ordered):
        x, y = entry["latency_p50_ms"], entry["accuracy"]
        ax.scatter(x, y, s=12 * max(entry["size_mb"], 1) ** 0.5, zorder=3)
        ax.annotate(f"{name}\n{entry['size_mb']:.0f} MB, {x:.2f} ms", (x, y), textcoords="offset points",
                    xytext=(6, 10 if k % 2 == 0 else -24), fontsize=8)
    accuracies = [e["accuracy"] for e in results.values()]
    ax.set_ylim(min(accuracies) - 0.02, max(accuracies) + 0.01)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("batch-1 latency, median (ms, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs latency (marker area ~ size on disk)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot_set_accuracies(rows: list[dict], path) -> Figure:
    """Accuracy with its 95% interval per evaluation set and model: are differences inside the noise? Returns the
    figure."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(2.2 + 1.6 * len(sets) * max(1, len(models) / 4), 4))
    ax = fig.subplots()
    width = 0.8 / len(models)
    for k, model in enumerate(models):
        mine = {r["set"]: r for r in rows if r["model"] == model}
        xs = [i + (k - (len(models) - 1) / 2) * width for i, name in enumerate(sets) if name in mine]
        ys = [mine[name]["accuracy"] for name in sets if name in mine]
        errors = [[mine[n]["accuracy"] - mine[n]["accuracy_low"] for n in sets if n in mine],
                  [mine[n]["accuracy_high"] - mine[n]["accuracy"] for n in sets if n in mine]]
        ax.errorbar(xs, ys, yerr=errors, fmt="o", capsize=3, label=model)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylabel("accuracy (95% bootstrap interval)")
    ax.set_title("Accuracy per evaluation set")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig

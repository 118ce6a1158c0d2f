"""DVC stage `summary`: the pipeline's headline numbers in one small file, metrics/summary.json, the
only file declared as DVC metrics, so `dvc metrics show`, `dvc metrics diff` and `dvc exp show` print a
table a screen wide. The detail stays in each stage's own file (metrics/evaluate.json, ...):
`dvc metrics show metrics/evaluate.json` prints any of them."""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import logging

from distilops import paths
from distilops.errors import DataError
from distilops.stage import read_json, run_stage, write_json

log = logging.getLogger("summary")


def served(register: dict) -> tuple[str, str]:
    """(variant, its name in the evaluation report) of what the registry serves on CPU: register.serving.cpu
    (onnx_int8_static by default), or onnx_fp32 when quantize rejected it."""
    for key, entry in register["versions"].items():
        if entry["role"] == "serving" and entry["device"] == "cpu":
            return key.split("@")[0], entry["evaluated_as"]
    raise DataError("metrics/register.json names no CPU serving version: rerun `dvc repro register`")


def headline(evaluation: dict, distill: dict, register: dict) -> dict:
    """Served model vs teacher on the test split (95% intervals), its speed and size, every extra set, its
    agreement with the teacher on every unlabelled set."""
    variant, key = served(register)
    model, teacher = evaluation["models"][key], evaluation["models"]["teacher"]
    summary = {
        "serving_variant": variant,
        "serving_version": register["serving_versions"]["cpu"],
        "test_accuracy": model["accuracy"],
        "test_accuracy_low": model["accuracy_ci"][0],
        "test_accuracy_high": model["accuracy_ci"][1],
        "teacher_test_accuracy": teacher["accuracy"],
        "retention": model["retention"],
        "retention_low": model["retention_ci"][0],
        "throughput_speedup": model["vs_teacher"]["throughput_speedup"],
        "latency_p50_ms": model["latency_p50_ms"],
        "size_mb": model["size_mb"],
        "student_layers": distill["student_layers"],
        "tuning_trials": distill["trials"],
    }
    for name, entry in evaluation.get("sets", {}).items():
        summary[f"{name}_accuracy"] = entry["models"][key]["accuracy"]
    for name, entry in evaluation.get("unlabeled_sets", {}).items():  # label-free: agreement with the teacher
        summary[f"{name}_agreement"] = entry["models"][key]["agreement_with_teacher"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}


def main() -> None:
    summary = headline(read_json(paths.metrics_file("evaluate")), read_json(paths.metrics_file("distill_choice")),
                       read_json(paths.metrics_file("register")))
    write_json(paths.metrics_file("summary"), summary)
    log.info("served %s (version %s): test accuracy %.4f [%.4f, %.4f], %.1f%% of the teacher's, %.2fx its "
             "throughput", summary["serving_variant"], summary["serving_version"], summary["test_accuracy"],
             summary["test_accuracy_low"], summary["test_accuracy_high"], 100 * summary["retention"],
             summary["throughput_speedup"])


if __name__ == "__main__":
    run_stage("summary", main)

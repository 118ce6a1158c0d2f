"""DVC stage `summary`: the pipeline's headline numbers in one small file, metrics/summary.json, the
only file declared as DVC metrics, so `dvc metrics show`, `dvc metrics diff` and `dvc exp show` print a
table a screen wide. The detail stays in each stage's own file (metrics/evaluate.json, ...):
`dvc metrics show metrics/evaluate.json` prints any of them."""

import json
import logging
from pathlib import Path

from distilops import paths
from distilops.errors import DataError
from distilops.stage import run_stage, write_json

log = logging.getLogger("summary")


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is missing or unreadable ({exc}): run `dvc repro` to rebuild it") from None


def serving_variant(register: dict) -> str:
    """The variant the registry serves on CPU (onnx_int8, or onnx_fp32 when quantize rejected int8)."""
    for key, entry in register["versions"].items():
        if entry["role"] == "serving" and entry["device"] == "cpu":
            return key.split("@")[0]
    raise DataError("metrics/register.json names no CPU serving version: rerun `dvc repro register`")


def headline(evaluation: dict, distill: dict, register: dict) -> dict:
    """Served model vs teacher on the test split (95% intervals), its speed and size, every extra set."""
    variant = serving_variant(register)
    served, teacher = evaluation["models"][f"student_{variant}"], evaluation["models"]["teacher"]
    summary = {
        "serving_variant": variant,
        "serving_version": register["serving_versions"]["cpu"],
        "test_accuracy": served["accuracy"],
        "test_accuracy_low": served["accuracy_ci"][0],
        "test_accuracy_high": served["accuracy_ci"][1],
        "teacher_test_accuracy": teacher["accuracy"],
        "retention": served["retention"],
        "retention_low": served["retention_ci"][0],
        "throughput_speedup": served["vs_teacher"]["throughput_speedup"],
        "latency_p50_ms": served["latency_p50_ms"],
        "size_mb": served["size_mb"],
        "student_layers": distill["student_layers"],
        "tuning_trials": distill["trials"],
    }
    for name, entry in evaluation.get("sets", {}).items():
        summary[f"{name}_accuracy"] = entry["models"][f"student_{variant}"]["accuracy"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}


def main() -> None:
    summary = headline(read(paths.metrics_file("evaluate")), read(paths.metrics_file("distill")),
                       read(paths.metrics_file("register")))
    write_json(paths.metrics_file("summary"), summary)
    log.info("served %s (version %s): test accuracy %.4f [%.4f, %.4f], %.1f%% of the teacher's, %.2fx its "
             "throughput", summary["serving_variant"], summary["serving_version"], summary["test_accuracy"],
             summary["test_accuracy_low"], summary["test_accuracy_high"], 100 * summary["retention"],
             summary["throughput_speedup"])


if __name__ == "__main__":
    run_stage("summary", main)

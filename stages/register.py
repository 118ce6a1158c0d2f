"""DVC stage `register`: the fp32 student and the serving model (ONNX int8 by default) become versions
of one registered model in the MLflow registry, each tagged with its lineage and test metrics.
Nothing here moves the `production` alias: that is `distilops promote`, behind its gates."""

import json
import logging
from pathlib import Path

import mlflow

from distilops import paths
from distilops.config import RegisterConfig, as_flat_dict, load_section
from distilops.hashing import sha256
from distilops.predict import read_meta
from distilops.registry import register_version
from distilops.stage import run_stage, write_json
from distilops.tracking import stage_run

log = logging.getLogger("register")
TAGGED_METRICS = ("accuracy", "macro_f1", "agreement_with_teacher", "latency_p50_ms", "latency_p95_ms",
                  "throughput_batch32", "size_mb", "parameters")


def test_metrics(evaluation: dict, variant: str) -> dict[str, float]:
    """A variant's test metrics from the evaluate stage, with its teacher's accuracy for the gates."""
    entry = evaluation["models"]["student" if variant == "student" else f"student_{variant}"]
    metrics = {k: float(entry[k]) for k in TAGGED_METRICS if k in entry}
    metrics["teacher_accuracy"] = float(evaluation["models"]["teacher"]["accuracy"])
    metrics["accuracy_retention"] = metrics["accuracy"] / metrics["teacher_accuracy"]
    return metrics


def main() -> None:
    cfg = load_section(RegisterConfig)
    evaluation = json.loads(paths.metrics_file("evaluate").read_text())
    checks = json.loads(paths.metrics_file("quantize").read_text())
    serving = cfg.serving_variant
    if serving != "student" and not checks.get(serving, {}).get("accepted", False):
        reason = checks[serving]["reason"] if serving in checks else "not built by the quantize stage"
        log.warning("serving variant '%s' is not registered: %s. The fp32 student serves instead.", serving, reason)
        serving = "student"
    params_text = Path("params.yaml").read_text()
    params_hash = sha256(params_text)
    # The student first, so the serving model is the newest version.
    plan = [("student", paths.STUDENT, "serving" if serving == "student" else "reference")]
    if serving != "student":
        plan.append((serving, paths.QUANTIZED / serving, "serving"))

    registered = {}
    with stage_run("register", as_flat_dict(cfg)):
        mlflow.log_text(params_text, "params.yaml")
        for variant, folder, role in plan:
            # register_version adds the lineage: git commit, data hash, teacher, study, best parameters.
            m = test_metrics(evaluation, variant)
            mv = register_version(
                folder, model_name=cfg.model_name, metrics=m,
                tags={"variant": variant, "role": role, "params_sha256": params_hash},
                description=f"{variant} ({role}) distilled from {read_meta(folder).get('teacher', '?')}")
            registered[variant] = {"version": int(mv.version), "role": role}
            log.info("%s v%s: %s (%s), test accuracy %.4f (%.1f%% of the teacher's), p95 %.2f ms", cfg.model_name,
                     mv.version, variant, role, m["accuracy"], 100 * m["accuracy_retention"], m["latency_p95_ms"])
    write_json(paths.metrics_file("register"), {"model_name": cfg.model_name, "versions": registered,
                                                "serving_version": registered[serving]["version"]})
    log.info("promote with: distilops promote %s", registered[serving]["version"])


if __name__ == "__main__":
    run_stage("register", main)

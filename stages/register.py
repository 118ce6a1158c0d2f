"""DVC stage `register`: the fp32 student and the serving model (ONNX int8 by default) become versions
of one registered model in the MLflow registry, each tagged with its lineage and test metrics.
Nothing here moves the `production` alias: that is `distilops promote`, behind its gates."""

import hashlib
import json
import sys
from pathlib import Path

import mlflow

from distilops.config import ConfigError, RegisterConfig, as_flat_dict, load_section
from distilops.predict import read_meta
from distilops.registry import RegistryError, register_version
from distilops.tracking import stage_run

STUDENT, QUANTIZED, OUT = Path("models/student"), Path("models/quantized"), Path("metrics/register.json")
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
    cfg = load_section(RegisterConfig, "register")
    evaluation = json.loads(Path("metrics/evaluate.json").read_text())
    checks = json.loads(Path("metrics/quantize.json").read_text())
    serving = cfg.serving_variant
    if serving != "student" and not checks.get(serving, {}).get("accepted", False):
        reason = checks[serving]["reason"] if serving in checks else "not built by the quantize stage"
        print(f"[register] serving variant '{serving}' is not registered: {reason}. The fp32 student serves instead.")
        serving = "student"
    params_text = Path("params.yaml").read_text()
    params_hash = hashlib.sha256(params_text.encode()).hexdigest()
    # The student first, so the serving model is the newest version.
    plan = [("student", STUDENT, "serving" if serving == "student" else "reference")]
    if serving != "student":
        plan.append((serving, QUANTIZED / serving, "serving"))

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
            print(f"[register] {cfg.model_name} v{mv.version}: {variant} ({role}), test accuracy "
                  f"{m['accuracy']:.4f} ({m['accuracy_retention']:.1%} of the teacher's), "
                  f"p95 {m['latency_p95_ms']:.2f} ms")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"model_name": cfg.model_name, "versions": registered,
                               "serving_version": registered[serving]["version"]}, indent=2) + "\n")
    print(f"[register] promote with: distilops promote {registered[serving]['version']}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, RegistryError) as exc:
        sys.exit(f"register: error: {exc}")

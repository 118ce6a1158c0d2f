"""DVC stage `register`: the fp32 student and the serving models (ONNX int8 for CPU nodes, ONNX fp16
for GPU nodes by default) become versions of one registered model in the MLflow registry, each
tagged with its lineage, its device and its test results from the evaluate stage. The CPU version is
the one promoted; its GPU sibling follows it (tags `release.cpu` / `release.gpu` on both). Nothing
here moves the `production` alias: that is `distilops promote`, behind its gates."""

import logging
import shutil
import tempfile
from pathlib import Path

import mlflow

from distilops import paths
from distilops.config import RegisterConfig, as_flat_dict, load_section
from distilops.errors import RegistryError
from distilops.hashing import sha256
from distilops.pipeline.evaluate import model_key
from distilops.release.registry import link_release, metrics_from_report, register_version
from distilops.serving.folder import read_meta, write_meta
from distilops.stage import read_json, run_stage, write_json
from distilops.tracking import stage_run

log = logging.getLogger("register")


def with_windows(folder: Path, cfg: RegisterConfig, into: Path) -> Path:
    """A copy of `folder` that records the window settings it was evaluated with, so it is served with them."""
    copy = Path(shutil.copytree(folder, into / folder.name))
    write_meta(copy, window_overlap=cfg.window_overlap, max_windows=cfg.max_windows)
    return copy


def serving_variants(cfg: RegisterConfig, checks: dict) -> dict[str, str]:
    """{device: variant}: the configured ONNX variant per device, onnx_fp32 where quantize rejected it."""
    plan = {}
    for device, wanted in cfg.serving.model_dump().items():
        if not wanted:
            continue
        variant = wanted
        if not checks.get(variant, {}).get("accepted", False):
            reason = checks[variant]["reason"] if variant in checks else "not built by the quantize stage"
            log.warning("%s variant %s is not registered: %s. onnx_fp32 serves instead.", device, variant, reason)
            variant = "onnx_fp32"
        if not checks.get(variant, {}).get("accepted", False):
            raise RegistryError(f"no accepted ONNX variant to serve on {device}: add onnx_fp32 to quantize.variants")
        plan[device] = variant
    if "cpu" not in plan:
        raise RegistryError("register.serving.cpu must name a variant: the CPU version is the one promoted")
    return plan


def main() -> None:
    cfg = load_section(RegisterConfig)
    evaluation = read_json(paths.metrics_file("evaluate"))
    devices = serving_variants(cfg, read_json(paths.metrics_file("quantize")))
    params_text = Path("params.yaml").read_text()
    # The student first, then the CPU serving version (the one promoted), then the GPU one (its sibling).
    plan = [("student", paths.STUDENT, "reference", "")]
    plan += [(variant, paths.QUANTIZED / variant, "serving", device) for device, variant in devices.items()]

    registered, release = {}, {}
    with stage_run("register", as_flat_dict(cfg)), tempfile.TemporaryDirectory() as scratch:
        mlflow.log_text(params_text, "params.yaml")
        for variant, folder, role, device in plan:
            key = model_key(variant)
            m = metrics_from_report(evaluation, key)
            mv = register_version(
                with_windows(folder, cfg, Path(scratch)), model_name=cfg.model_name, metrics=m, variant=variant,
                role=role, device=device, test_correct=evaluation["models"][key]["test_correct"],
                test_examples=evaluation["test_examples"], tags={"params_sha256": sha256(params_text)},
                description=f"{variant} ({role}{', ' + device if device else ''}) distilled from "
                            f"{read_meta(folder).get('teacher', '?')}")
            registered[f"{variant}@{device}" if device else variant] = {
                "version": int(mv.version), "role": role, "device": device, "evaluated_as": key}
            if device:
                release[device] = str(mv.version)
            log.info("%s v%s: %s (%s%s), test accuracy %.4f [%.3f, %.3f] (%.1f%% [%.1f%%, %.1f%%] of the "
                     "teacher's), p95 %.2f ms", cfg.model_name, mv.version, variant, role,
                     f", {device}" if device else "", m["accuracy"], m["accuracy_low"], m["accuracy_high"],
                     100 * m["accuracy_retention"], 100 * m["accuracy_retention_low"],
                     100 * m["accuracy_retention_high"], m["latency_p95_ms"])
        link_release(cfg.model_name, release)
    write_json(paths.metrics_file("register"), {"model_name": cfg.model_name, "versions": registered,
                                                "serving_version": int(release["cpu"]),
                                                "serving_versions": {d: int(v) for d, v in release.items()}})
    log.info("promote with: distilops promote %s", release["cpu"])


if __name__ == "__main__":
    run_stage("register", main)

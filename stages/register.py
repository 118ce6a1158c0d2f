"""DVC stage `register`: the fp32 student and the serving models (ONNX int8 for CPU nodes, ONNX fp16
for GPU nodes by default) become versions of one registered model in the MLflow registry, each
tagged with its lineage, its device and its test results from the evaluate stage. The CPU version is
the one promoted; its GPU sibling follows it (tags `release.cpu` / `release.gpu` on both). The teacher's
ONNX export (quantize, if it agreed with the PyTorch teacher) is registered too, role "teacher": the shadow
model, named on every version of the release by `release.shadow`, that `distilops package` carries beside
the served model. Each served folder records the windows it was evaluated with and, from evaluate, the
reference its live predictions are compared with. Nothing here moves the `production` alias: that is
`distilops promote`, behind its gates. The student and the served versions also record which depth the distill
stage chose (`distill.*` tags: the point and why it is on the frontier; the rule that picked it is the distill
run's); the whole depth frontier is an artifact of this stage's run."""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import logging
import shutil
import tempfile
from dataclasses import astuple
from pathlib import Path

import mlflow

from distilops import paths
from distilops.config import RegisterConfig, as_flat_dict, load_section
from distilops.hashing import sha256
from distilops.pipeline.evaluate import BASELINE, model_key
from distilops.pipeline.quantize import TEACHER_CHECK, TEACHER_VARIANT
from distilops.release.registry import (
    TEACHER_ROLE,
    Planned,
    choice_tags,
    link_release,
    link_shadow,
    metrics_from_report,
    register_version,
    release_plan,
)
from distilops.serving.folder import read_meta, write_meta
from distilops.stage import read_json, run_stage, table_csv, write_json
from distilops.tracking import stage_run

log = logging.getLogger("register")


def with_windows(folder: Path, cfg: RegisterConfig, into: Path, reference: dict | None = None) -> Path:
    """A copy of `folder` that records the window settings it was evaluated with, so it is served with them,
    and (serving candidates) the `reference` description of its test predictions the service compares with."""
    copy = Path(shutil.copytree(folder, into / folder.name))
    write_meta(copy, window_overlap=cfg.window_overlap, max_windows=cfg.max_windows,
               **({"reference": reference} if reference else {}))
    return copy


def description(variant: str, role: str, device: str, folder: Path) -> str:
    meta = read_meta(folder)
    if role == TEACHER_ROLE:
        return (f"{variant} (teacher): {meta.get('source_model', '?')} fine-tuned, as ONNX: the shadow model "
                "its release's pods may compare their answers with")
    return f"{variant} ({role}{', ' + device if device else ''}) distilled from {meta.get('teacher', '?')}"


def summary(m: dict[str, float]) -> str:
    """Accuracy and its interval, retention where the version has a teacher to retain, p95 latency."""
    text = f"test accuracy {m['accuracy']:.4f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}]"
    if "accuracy_retention_low" in m:
        text += (f" ({100 * m['accuracy_retention']:.1f}% [{100 * m['accuracy_retention_low']:.1f}%, "
                 f"{100 * m['accuracy_retention_high']:.1f}%] of the teacher's)")
    return f"{text}, p95 {m['latency_p95_ms']:.2f} ms"


def distill_report() -> dict:
    """metrics/distill_choice.json (the chosen point and the frontier, not the rule: a rule change that picks the
    same point reruns nothing here); {} where it is missing (a registry fed by hand, or tests): no choice is
    recorded."""
    found = paths.metrics_file("distill_choice")
    if not found.exists():
        log.warning("%s is missing: the versions record no choice of student depth", found)
        return {}
    return read_json(found)


def log_frontier(distill: dict, scratch: Path) -> None:
    """The depth frontier (every complete trial) as frontier/frontier.csv of the active run (its plot, which draws
    the rule, is the distill run's)."""
    rows = distill.get("frontier") or []
    if not rows:  # depth not searched: nothing to compare the student with
        return
    table = scratch / "frontier.csv"
    table.write_text(table_csv(rows))
    mlflow.log_artifact(str(table), artifact_path="frontier")


def main() -> None:
    cfg = load_section(RegisterConfig)
    evaluation = read_json(paths.metrics_file("evaluate"))
    checks = read_json(paths.metrics_file("quantize"))
    # The student first, then the CPU serving version (the one promoted), then the GPU one (its sibling), then
    # the teacher's export (the shadow model) when quantize accepted it.
    plan = release_plan(cfg.serving.model_dump(), checks, student=paths.STUDENT, quantized=paths.QUANTIZED,
                        teacher=Planned(TEACHER_VARIANT, paths.TEACHER_ONNX, TEACHER_ROLE, "", BASELINE),
                        teacher_check=TEACHER_CHECK, evaluated_as=model_key)
    params_text = Path("params.yaml").read_text()
    distill = distill_report()
    chosen = choice_tags(distill)  # on the student and the served versions: the teacher's depth was not chosen

    registered, release, shadow = {}, {}, ""
    with stage_run("register", as_flat_dict(cfg)), tempfile.TemporaryDirectory() as scratch:
        mlflow.log_text(params_text, "params.yaml")
        log_frontier(distill, Path(scratch))
        if distill.get("choice", {}).get("reason"):
            log.info("student depth: %s", distill["choice"]["reason"])
        for variant, folder, role, device, key in (astuple(p) for p in plan):
            evaluated = evaluation["models"][key]
            m = metrics_from_report(evaluation, key)
            mv = register_version(
                with_windows(folder, cfg, Path(scratch), evaluated.get("reference")), model_name=cfg.model_name,
                metrics=m, variant=variant, role=role, device=device, test_correct=evaluated["test_correct"],
                test_examples=evaluation["test_examples"],
                tags={"params_sha256": sha256(params_text), **({} if role == TEACHER_ROLE else chosen)},
                description=description(variant, role, device, folder))
            registered[f"{variant}@{device}" if device else variant] = {
                "version": int(mv.version), "role": role, "device": device, "evaluated_as": key}
            if device:
                release[device] = str(mv.version)
            if role == TEACHER_ROLE:
                shadow = str(mv.version)
            log.info("%s v%s: %s (%s%s), %s", cfg.model_name, mv.version, variant, role,
                     f", {device}" if device else "", summary(m))
        link_release(cfg.model_name, release)
        if shadow:  # every version of the release names its shadow: the served ones, the student, the teacher
            link_shadow(cfg.model_name, [str(r["version"]) for r in registered.values()], shadow)
    write_json(paths.metrics_file("register"), {"model_name": cfg.model_name, "versions": registered,
                                                "serving_version": int(release["cpu"]),
                                                "serving_versions": {d: int(v) for d, v in release.items()},
                                                "shadow_version": int(shadow) if shadow else None})
    log.info("promote with: distilops promote %s", release["cpu"])


if __name__ == "__main__":
    run_stage("register", main)

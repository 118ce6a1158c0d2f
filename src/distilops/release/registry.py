"""The MLflow model registry: versions with lineage and metrics, gated promotion, an audit trail.

- Every version carries tags: its lineage (git commit, data hash, teacher, Optuna study, params
  hash, source run), what it is (variant, format, role) and its test metrics (`eval.*`), so the
  gates read the numbers from the registry itself and the UI shows them beside the version.
- The student and its serving versions also carry the distill stage's choice of depth (`distill.*`:
  the layers, the reason in words, the rule, the Pareto points), shown by `distilops versions`.
- `promote` moves an alias (default `production`) to a version only when its gates pass:
  accuracy retention versus its teacher (the lower end of its 95% interval), no significant
  regression versus the current production version (exact McNemar test on the same test texts,
  from the per-text correctness each version carries), batch-1 p95 latency under a bound.
  `force_reason` overrides, recorded.
- Every promotion and rollback is an MLflow run in the `distilops-promotions` experiment (who,
  when, from which version to which, why, every gate's numbers): append-only, kept in the same
  store as the registry (local SQLite or a shared server), listed by `history`. The move and its
  record are one recoverable unit: the run is opened (RUNNING) with the whole event, the version
  is tagged, then the alias moves, then the run is closed (FINISHED). A process killed anywhere in
  between leaves a RUNNING event, which the next `promote` or `history` reconciles against the
  alias: moved -> FINISHED (tagged `reconciled`), not moved -> FAILED. So `history` and
  `--rollback` always see every move that happened, and none that did not.
- A canary release (`distilops deploy --strategy canary --apply`) records what the cluster decided in the
  same history: `canary-promoted`, or `canary-aborted` with the alias moved back to the version the cluster
  still serves, by the same protocol (`record_canary`). `--rollback` goes by promotions and rollbacks only.
"""

from __future__ import annotations

import getpass
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from distilops import settings
from distilops.config import ChooseRule, PromoteConfig
from distilops.errors import ConfigError, GateError, RegistryError
from distilops.hashing import folder_sha256
from distilops.release.pyfunc import log_model_folder
from distilops.serving.folder import read_meta
from distilops.stats import mcnemar, retention, unpack_correct
from distilops.tracking import configure, lineage

PROMOTIONS_EXPERIMENT = "distilops-promotions"
log = logging.getLogger(__name__)

# --- the tag schema: what a version carries (written by register_version and link_release; read by the
# gates, `distilops versions`, packaging, images and deploy) --------------------------------------------
VARIANT, ROLE, DEVICE = "variant", "role", "device"  # onnx_int8 ...; serving | reference | teacher; cpu | gpu | ""
TEACHER_ROLE = "teacher"  # the release's teacher as ONNX: the shadow model its pods may compare against
RELEASE_PREFIX = "release."  # release.<device>: the version serving that device in this version's release
SHADOW_TAG = f"{RELEASE_PREFIX}shadow"  # the release's teacher version, on every version of the release
METRIC_PREFIX = "eval."  # eval.<metric> on the test split, eval.<set>.<metric> on each extra and unlabelled set
FOLDER_TAG = "folder_sha256"  # the registered folder's content hash: an identical folder adds no version
CORRECT_TAG = "test_correct"  # which test texts the version got right (stats.pack_correct), for paired gates
TEST_EXAMPLES = "test_examples"  # how many: with data_hash, says two versions were tested on the same texts
GATE_METRICS = ("accuracy", "teacher_accuracy", "latency_p95_ms")
TAGGED_METRICS = ("accuracy", "macro_f1", "agreement_with_teacher", "latency_p50_ms", "latency_p95_ms", "size_mb",
                  "parameters")
FOLDER_LINEAGE = ("teacher", "teacher_sha256", "optuna_study", "best_temperature", "best_alpha",
                  "best_learning_rate", "best_cosine_weight", "max_length", "mlflow_run_id")


def client() -> mlflow.MlflowClient:
    configure()
    return mlflow.MlflowClient()


# --- registering -----------------------------------------------------------------------------------


def metrics_from_report(report: dict, key: str) -> dict[str, float]:
    """Model `key`'s metrics from the evaluate stage's report (metrics/evaluate.json), as its version carries
    them: on the test split with 95% intervals and its teacher's accuracy (what the gates read) and,
    prefixed by the set's name, on every extra set, and its agreement with the teacher (interval) on every
    unlabelled set. `key` "teacher" (the shadow version) has no retention interval or McNemar test: it is the
    baseline."""
    entry = report["models"][key]
    metrics = {k: float(v) for k, v in entry.items() if k in TAGGED_METRICS or k.startswith("throughput_batch")}
    metrics["teacher_accuracy"] = float(report["models"]["teacher"]["accuracy"])
    metrics["accuracy_retention"] = retention(metrics["accuracy"], metrics["teacher_accuracy"])
    metrics["accuracy_low"], metrics["accuracy_high"] = entry["accuracy_ci"]
    if "agreement_with_teacher_ci" in entry:  # reports written before the interval have the point only
        low, high = entry["agreement_with_teacher_ci"]
        metrics["agreement_with_teacher_low"], metrics["agreement_with_teacher_high"] = low, high
    if "retention_ci" in entry:  # the teacher itself has no retention interval nor McNemar test against itself
        metrics["accuracy_retention_low"], metrics["accuracy_retention_high"] = entry["retention_ci"]
        metrics["mcnemar_vs_teacher_p"] = entry["mcnemar_vs_teacher"]["p_value"]
    for set_name, found in report.get("sets", {}).items():
        m = found["models"][key]
        metrics.update({f"{set_name}.accuracy": m["accuracy"], f"{set_name}.accuracy_low": m["accuracy_ci"][0],
                        f"{set_name}.accuracy_high": m["accuracy_ci"][1],
                        f"{set_name}.agreement_with_teacher": m["agreement_with_teacher"]})
    for set_name, found in report.get("unlabeled_sets", {}).items():
        m = found["models"][key]
        metrics[f"{set_name}.agreement_with_teacher"] = m["agreement_with_teacher"]
        metrics[f"{set_name}.agreement_with_teacher_low"], metrics[f"{set_name}.agreement_with_teacher_high"] = m[
            "agreement_with_teacher_ci"]
    return metrics


def register_version(folder: Path, *, model_name: str, metrics: dict[str, float], variant: str = "",
                     role: str = "", device: str = "", test_correct: str = "", test_examples: int = 0,
                     tags: dict[str, str] | None = None, description: str = "") -> ModelVersion:
    """Log `folder` as a pyfunc model in the active run, register it, tag it; returns the new version.

    Tags: lineage (git commit, data hash, and the teacher, Optuna study, best parameters and format
    that the folder's distilops.json records), what the version is (variant, role, device), the folder's content
    hash, its test results (`eval.*` metrics, per-text correctness); `tags` may add or override any.

    A folder identical (same content hash) to an existing version's of the same role and variant adds no version:
    that version is returned, unchanged, and the log names it.
    """
    folder_hash = folder_sha256(folder)
    same = same_folder_version(model_name, folder_hash, role=role, variant=variant)
    if same is not None:
        log.info("%s v%s already holds this folder (%s %s, %s %s...): no new version", model_name, same.version,
                 ROLE, role or "-", FOLDER_TAG, folder_hash[:12])
        return same
    meta = read_meta(folder)
    recorded = {k: str(meta[k]) for k in FOLDER_LINEAGE if k in meta}
    described = {VARIANT: variant, ROLE: role, DEVICE: device, FOLDER_TAG: folder_hash, CORRECT_TAG: test_correct,
                 TEST_EXAMPLES: str(test_examples) if test_examples else ""}
    tags = {**lineage(), **recorded, "format": meta.get("format", "pytorch"), **described, **(tags or {})}

    info = log_model_folder(folder, name=tags.get(VARIANT) or "model", registered_model_name=model_name,
                            metadata={k: v for k, v in tags.items() if not k.startswith(METRIC_PREFIX)})
    mlflow.log_metrics(metrics, model_id=info.model_id)  # MLflow 3 shows them on the logged model too
    c = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    all_tags = {**tags, **{f"{METRIC_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()}}
    for key, value in all_tags.items():
        if str(value):
            c.set_model_version_tag(model_name, version, key, str(value))
    if description:
        c.update_model_version(model_name, version, description=description)
    return c.get_model_version(model_name, version)


def same_folder_version(model_name: str, folder_hash: str, *, role: str, variant: str) -> ModelVersion | None:
    """The newest version of `model_name` registered from a folder with this content hash, role and variant."""
    c = mlflow.MlflowClient()
    try:
        versions = c.search_model_versions(f"name = '{model_name}'")
    except MlflowException:  # no such model yet
        return None
    same = [v for v in versions if v.tags.get(FOLDER_TAG) == folder_hash and v.tags.get(ROLE, "") == role
            and v.tags.get(VARIANT, "") == variant]
    return max(same, key=lambda v: int(v.version), default=None)


# --- what one release registers: the register stage's plan -------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One version the register stage creates: its folder, what it is, and its entry in the evaluation report."""

    variant: str
    folder: Path
    role: str  # reference (the fp32 student) | serving | teacher (the shadow)
    device: str  # cpu | gpu for serving versions, "" otherwise
    evaluated_as: str  # its key in metrics/evaluate.json's "models"


FALLBACK_VARIANT = "onnx_fp32"  # served where quantize rejected the configured variant


def serving_variants(wanted: Mapping[str, str], checks: Mapping[str, dict]) -> dict[str, str]:
    """{device: variant}: the configured ONNX variant per device (`wanted`, register.serving; "" = none), onnx_fp32
    where the quantize stage's report (`checks`) says it rejected it. The CPU one is required: it is promoted."""
    plan = {}
    for device, variant in wanted.items():
        if not variant:
            continue
        if not checks.get(variant, {}).get("accepted", False):
            reason = checks[variant]["reason"] if variant in checks else "not built by the quantize stage"
            log.warning("%s variant %s is not registered: %s. %s serves instead.", device, variant, reason,
                        FALLBACK_VARIANT)
            variant = FALLBACK_VARIANT
        if not checks.get(variant, {}).get("accepted", False):
            raise RegistryError(f"no accepted ONNX variant to serve on {device}: add {FALLBACK_VARIANT} to "
                                "quantize.variants")
        plan[device] = variant
    if "cpu" not in plan:
        raise RegistryError("register.serving.cpu must name a variant: the CPU version is the one promoted")
    return plan


def shadow_accepted(check: dict | None) -> bool:
    """Whether the teacher's ONNX export (its entry in the quantize report) is registered as the release's shadow;
    a warning with the reason when not."""
    if check and check.get("accepted", False):
        return True
    reason = check["reason"] if check else "not built by the quantize stage"
    log.warning("the teacher's ONNX export is not registered: %s. This release carries no shadow model.", reason)
    return False


def release_plan(wanted: Mapping[str, str], checks: Mapping[str, dict], *, student: Path, quantized: Path,
                 teacher: Planned, teacher_check: str, evaluated_as: Callable[[str], str]) -> list[Planned]:
    """The versions of one release, in the order they are registered: the student, the CPU serving version (the one
    promoted), the GPU one (its sibling), then `teacher` (the shadow) when quantize accepted it (`teacher_check`:
    its entry in the quantize report). `evaluated_as`: a variant's key in the evaluation report."""
    plan = [Planned("student", student, "reference", "", evaluated_as("student"))]
    plan += [Planned(variant, quantized / variant, "serving", device, evaluated_as(variant))
             for device, variant in serving_variants(wanted, checks).items()]
    return plan + ([teacher] if shadow_accepted(checks.get(teacher_check)) else [])


# --- the student's depth: what the distill stage chose and why (metrics/distill.json's "choice", "frontier") ---

DISTILL_PREFIX = "distill."
LAYERS_TAG = f"{DISTILL_PREFIX}student_layers"
CHOICE_TAG = f"{DISTILL_PREFIX}choice"  # the distill stage's reason, in words
TRIAL_TAG = f"{DISTILL_PREFIX}trial"  # the Optuna trial the student's parameters come from
RULE_TAG = f"{DISTILL_PREFIX}rule"  # distill.choose as compact JSON (searched depth only)
FRONTIER_TAG = f"{DISTILL_PREFIX}frontier"  # the Pareto points as compact JSON (searched depth only)
TAG_VALUE_LIMIT = 5000  # MLflow refuses a longer model version tag value
FRONTIER_FIELDS = {"trial": "trial", "layers": "student_layers", "latency_ms": "latency_ms", "speedup": "speedup",
                   "val_agreement": "val_agreement", "general_agreement": "general_agreement"}


def clip(text: str, limit: int = TAG_VALUE_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def pareto_tag(rows: list[dict], chosen: int | None) -> str:
    """The Pareto rows, fastest first, as compact JSON under the tag limit. Should they not fit, the slowest are
    dropped first, never the chosen point: the list stays valid JSON (a cut string would not parse)."""
    def entry(row: dict) -> dict:
        return {key: round(float(row[field]), 4) if isinstance(row[field], float) else row[field]
                for key, field in FRONTIER_FIELDS.items() if field in row}

    front = [entry(r) for r in sorted((r for r in rows if r.get("pareto")), key=lambda r: r.get("latency_ms", 0))]
    while len(compact(front)) > TAG_VALUE_LIMIT:
        droppable = [i for i, e in enumerate(front) if e.get("trial") != chosen]
        if not droppable:
            break
        front.pop(droppable[-1])
    return compact(front) if front else ""


def choice_tags(distill: dict) -> dict[str, str]:
    """The tags that say which depth the student has and why, from the distill stage's report. A report written
    before depth was searched has no "choice": only its depth (if it records one) is tagged."""
    choice = distill.get("choice") or {}
    layers = choice.get("student_layers", distill.get("student_layers"))
    tags = {LAYERS_TAG: str(layers)} if layers is not None else {}
    if not choice:
        return tags
    tags[CHOICE_TAG] = clip(str(choice.get("reason", "")))
    if choice.get("trial") is not None:
        tags[TRIAL_TAG] = str(choice["trial"])
    if choice.get("rule"):
        tags[RULE_TAG] = clip(compact(choice["rule"]))
    front = pareto_tag(distill.get("frontier") or [], choice.get("trial"))
    if front:
        tags[FRONTIER_TAG] = front
    return {k: v for k, v in tags.items() if v}  # an empty value is no tag (register_version skips them too)


def choice_line(tags: dict[str, str], width: int = 113) -> str:
    """One line for `distilops versions`: the depth chosen, how much faster than the teacher, under which rule;
    '' when the version records no choice. At most `width` characters."""
    reason = tags.get(CHOICE_TAG, "")
    if not reason:
        return ""
    try:
        rule, front = json.loads(tags.get(RULE_TAG) or "{}"), json.loads(tags.get(FRONTIER_TAG) or "[]")
    except json.JSONDecodeError:
        rule, front = {}, []
    if not rule:  # depth not searched: the reason says how it was fixed
        return clip(f"chosen: {reason}", width)
    try:
        recorded = ChooseRule(**rule)
    except ConfigError:  # a rule another distilops version wrote: shown as recorded
        return clip(f"chosen: {tags.get(LAYERS_TAG, '?')} layers (trial {tags.get(TRIAL_TAG, '?')}); rule "
                    f"{compact(rule)}", width)
    trial = tags.get(TRIAL_TAG, "?")
    speedup = next((p["speedup"] for p in front if str(p.get("trial")) == trial and "speedup" in p), None)
    faster = f", {speedup:.1f}x the teacher" if speedup is not None else ""
    line = f"chosen: {tags.get(LAYERS_TAG, '?')} layers (trial {trial}) of the frontier{faster}; rule {recorded.text()}"
    if len(line) > width:  # every limit set: the words the line can spare, then the rule as comparisons
        line = line.replace(" of the frontier", "")
    if len(line) > width:
        signs = {"min_speedup": "speedup>={:g}", "max_latency_ms": "latency<={:g}ms", "min_agreement": "fidelity>={:g}"}
        short = [signs[name].format(value) for name, value in recorded.active_limits()]
        line = line.split("; rule ")[0] + "; rule " + " ".join([*short, f"tol {recorded.tolerance:g}"])
    return clip(line, width)


def version_metrics(mv: ModelVersion) -> dict[str, float]:
    return {k[len(METRIC_PREFIX):]: float(v) for k, v in mv.tags.items() if k.startswith(METRIC_PREFIX)}


def get_version(c: mlflow.MlflowClient, model_name: str, version: str | int) -> ModelVersion:
    try:
        return c.get_model_version(model_name, str(version))
    except MlflowException as exc:
        known = sorted(int(v.version) for v in c.search_model_versions(f"name = '{model_name}'"))
        raise RegistryError(f"model '{model_name}' has no version {version} (versions: {known or 'none'})") from exc


def alias_version(c: mlflow.MlflowClient, model_name: str, alias: str) -> ModelVersion | None:
    try:
        return c.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def list_versions(c: mlflow.MlflowClient, model_name: str) -> list[ModelVersion]:
    versions = c.search_model_versions(f"name = '{model_name}'")
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def latest_serving_version(c: mlflow.MlflowClient, model_name: str) -> ModelVersion:
    """The newest CPU serving version: what `promote` moves the alias to by default (its GPU sibling follows)."""
    for mv in list_versions(c, model_name):
        if mv.tags.get(ROLE) == "serving" and mv.tags.get(DEVICE) in ("cpu", "", None):
            return mv
    raise RegistryError(f"model '{model_name}' has no serving version: run the pipeline (`dvc repro`) first")


# --- devices: one release, one version per device ---------------------------------------------------

DEVICES = ("cpu", "gpu")


def link_release(model_name: str, release: dict[str, str]) -> None:
    """Tag each version of one release with the version that serves every device (`release.cpu`, `release.gpu`)."""
    c = client()
    for version in release.values():
        for device, serving in release.items():
            c.set_model_version_tag(model_name, version, f"{RELEASE_PREFIX}{device}", serving)


def link_shadow(model_name: str, versions: list[str], shadow: str) -> None:
    """Tag each version of one release with its teacher's version (`release.shadow`): what `package` carries
    beside the served model, for the service to compare a sample of its answers against."""
    c = client()
    for version in versions:
        c.set_model_version_tag(model_name, version, SHADOW_TAG, shadow)


def version_for_device(c: mlflow.MlflowClient, model_name: str, mv: ModelVersion, device: str) -> ModelVersion:
    """The version that serves `device` in `mv`'s release (`mv` itself, or its sibling)."""
    if device not in DEVICES:
        raise RegistryError(f"unknown device '{device}': use one of {list(DEVICES)}")
    if mv.tags.get(f"{RELEASE_PREFIX}{device}"):
        return get_version(c, model_name, mv.tags[f"{RELEASE_PREFIX}{device}"])
    if (mv.tags.get(DEVICE) or "cpu") == device:  # versions registered before device tags count as CPU ones
        return mv
    raise RegistryError(f"version {mv.version} of '{model_name}' has no {device.upper()} variant: register one "
                        f"(register.serving.{device} in params.yaml, then `dvc repro`)")


# --- gates -----------------------------------------------------------------------------------------


@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str
    skipped: bool = False


def check_gates(candidate: ModelVersion, current: ModelVersion | None, gates: PromoteConfig, *,
                rollback: bool = False) -> list[GateResult]:
    m = version_metrics(candidate)
    missing = [k for k in GATE_METRICS if k not in m]
    if missing:
        return [GateResult("metrics", False, f"version {candidate.version} has no {missing} tags "
                                             "(register versions through the register stage)")]
    results = []
    kept = retention(m["accuracy"], m["teacher_accuracy"])
    if "accuracy_retention_low" in m:  # noise-aware: the interval's lower end must clear the bar
        low, high = m["accuracy_retention_low"], m["accuracy_retention_high"]
        results.append(GateResult(
            "accuracy_retention", low >= gates.min_accuracy_retention,
            f"accuracy {m['accuracy']:.4f} is {kept:.2%} of its teacher's {m['teacher_accuracy']:.4f}, 95% "
            f"interval [{low:.2%}, {high:.2%}] (lower end needs >= {gates.min_accuracy_retention:.2%})"))
    else:  # versions registered before intervals: the point estimate
        results.append(GateResult(
            "accuracy_retention", kept >= gates.min_accuracy_retention,
            f"accuracy {m['accuracy']:.4f} is {kept:.2%} of its teacher's {m['teacher_accuracy']:.4f} "
            f"(needs >= {gates.min_accuracy_retention:.2%}; no interval recorded)"))
    results.append(GateResult(
        "latency", m["latency_p95_ms"] <= gates.max_latency_p95_ms,
        f"batch-1 p95 latency {m['latency_p95_ms']:.2f} ms (bound {gates.max_latency_p95_ms} ms)"))
    if current is None or str(current.version) == str(candidate.version):
        results.append(GateResult("no_regression", True, "no current production version", skipped=True))
    elif rollback:
        results.append(GateResult("no_regression", True,
                                  f"rollback from version {current.version}: not compared", skipped=True))
    elif "accuracy" not in version_metrics(current):
        results.append(GateResult("no_regression", True,
                                  f"production version {current.version} has no metrics", skipped=True))
    else:
        results.append(no_regression(candidate, current, gates))
    return results


def accuracy_text(mv: ModelVersion) -> str:
    m = version_metrics(mv)
    interval = f" [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}]" if "accuracy_low" in m else ""
    return f"{m['accuracy']:.4f}{interval}"


def no_regression(candidate: ModelVersion, current: ModelVersion, gates: PromoteConfig) -> GateResult:
    """Refuse a drop vs production larger than the tolerance that is also significant: with both versions'
    per-text results on the same test split, the exact McNemar test says whether the drop is more than noise."""
    drop = version_metrics(current)["accuracy"] - version_metrics(candidate)["accuracy"]
    compared = (f"accuracy {accuracy_text(candidate)} vs production v{current.version} {accuracy_text(current)} "
                f"(drop {drop:+.4f}, tolerance {gates.max_accuracy_drop}")
    same_texts = (candidate.tags.get("data_hash") == current.tags.get("data_hash")
                  and candidate.tags.get(TEST_EXAMPLES) == current.tags.get(TEST_EXAMPLES))
    if same_texts and CORRECT_TAG in candidate.tags and CORRECT_TAG in current.tags:
        n = int(candidate.tags[TEST_EXAMPLES])
        test = mcnemar(unpack_correct(candidate.tags[CORRECT_TAG], n), unpack_correct(current.tags[CORRECT_TAG], n))
        significant = test["p_value"] < gates.significance
        return GateResult(
            "no_regression", not (drop > gates.max_accuracy_drop + 1e-12 and significant),
            f"{compared}; McNemar on the same {n} texts: {test['a_only']} only the candidate gets right, "
            f"{test['b_only']} only production, p = {test['p_value']:.3g}, "
            f"{'significant' if significant else 'not significant'} at {gates.significance})")
    why = "different test splits: data hashes differ" if not same_texts else "no per-text results recorded"
    return GateResult("no_regression", drop <= gates.max_accuracy_drop + 1e-12,
                      f"{compared}; not paired ({why}): the point estimates are compared)")


# --- promotion and its record ----------------------------------------------------------------------


@dataclass
class PromotionEvent:
    when: str
    user: str
    action: str  # promote | rollback, with "-forced" when gates were overridden; canary-promoted | canary-aborted
    model_name: str
    alias: str
    from_version: str  # "" when the alias pointed nowhere
    to_version: str
    reason: str
    gates: list[dict]
    run_id: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def current_user() -> str:
    return settings.USER.read() or getpass.getuser()


def _promotions_experiment(c: mlflow.MlflowClient) -> str:
    found = c.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    return found.experiment_id if found else c.create_experiment(PROMOTIONS_EXPERIMENT)


STALE_SECONDS = 120  # an unclosed event this old whose move did not happen is a crash, not one in flight


def reconcile(c: mlflow.MlflowClient, model_name: str, experiment_id: str) -> None:
    """Close the events a killed `promote` left RUNNING: FINISHED if the alias points where the event says
    it moved it (the move happened), FAILED if not and the event is stale."""
    unclosed = c.search_runs([experiment_id], f"tags.model_name = '{model_name}' and attributes.status = 'RUNNING'")
    now_ms = datetime.now(timezone.utc).timestamp() * 1000
    for run in unclosed:
        tags = run.data.tags
        holder = alias_version(c, model_name, tags.get("alias", ""))
        if holder is not None and str(holder.version) == tags.get("to_version"):
            c.set_tag(run.info.run_id, "reconciled", "true: the alias had moved; the process ended before closing")
            c.set_terminated(run.info.run_id, status="FINISHED")
        elif now_ms - run.info.start_time > STALE_SECONDS * 1000:
            c.set_tag(run.info.run_id, "reconciled", "true: the alias never moved")
            c.set_terminated(run.info.run_id, status="FAILED")


def history(model_name: str, *, alias: str | None = None, limit: int = 100) -> list[PromotionEvent]:
    """Completed promotions and rollbacks of `model_name`, newest first."""
    c = client()
    found = c.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
    if found is None:
        return []
    reconcile(c, model_name, found.experiment_id)
    query = f"tags.model_name = '{model_name}' and attributes.status = 'FINISHED'"
    if alias:
        query += f" and tags.alias = '{alias}'"
    runs = c.search_runs([found.experiment_id], query, order_by=["attributes.start_time DESC"],
                         max_results=limit)
    events = []
    for run in runs:
        t = run.data.tags
        events.append(PromotionEvent(
            when=t.get("when", ""), user=t.get("user", ""), action=t.get("action", ""), model_name=model_name,
            alias=t.get("alias", ""), from_version=t.get("from_version", ""), to_version=t.get("to_version", ""),
            reason=t.get("reason", ""), gates=json.loads(t.get("gates", "[]")), run_id=run.info.run_id))
    return events


def previous_version(model_name: str, alias: str, current: ModelVersion | None) -> str:
    """The version the alias pointed at before it moved to `current` (what a rollback returns to)."""
    if current is None:
        raise RegistryError(f"'{model_name}@{alias}' points nowhere: nothing to roll back")
    for event in history(model_name, alias=alias):
        if event.action.startswith(CANARY_PREFIX):  # a canary's outcome says what the cluster did, not which
            continue                                # version held the alias before (an abort returns to it)
        if event.to_version == str(current.version):
            if not event.from_version:
                break
            return event.from_version
    raise RegistryError(f"no earlier '{alias}' version of '{model_name}' is recorded before "
                        f"version {current.version}: nothing to roll back to")


def promote(model_name: str, gates: PromoteConfig, *, version: str | int | None = None, rollback: bool = False,
            force_reason: str | None = None, reason: str = "", user: str | None = None,
            dry_run: bool = False) -> tuple[PromotionEvent, list[GateResult]]:
    """Move `gates.alias` to a version that passes its gates; record the move. Raises GateError on refusal.

    `version` None: the newest serving version. `rollback`: the version before the current one, which
    skips the no-regression gate (it compares against the version being left). Naming an earlier
    version instead is a promotion like any other: every gate applies.
    """
    c = client()
    alias = gates.alias
    try:
        c.get_registered_model(model_name)
    except MlflowException as exc:
        raise RegistryError(f"no registered model '{model_name}' in {mlflow.get_tracking_uri()}: "
                            "run the pipeline (`dvc repro`) first") from exc
    reconcile(c, model_name, _promotions_experiment(c))  # a promote killed mid-way is settled first
    current = alias_version(c, model_name, alias)
    if rollback and version is not None:
        raise RegistryError("give either a version or --rollback, not both")
    if rollback:
        target = get_version(c, model_name, previous_version(model_name, alias, current))
    elif version is None:
        target = latest_serving_version(c, model_name)
    else:
        target = get_version(c, model_name, version)
    if current is not None and str(target.version) == str(current.version):
        raise RegistryError(f"version {target.version} is already '{model_name}@{alias}'")
    if target.status != "READY":
        raise RegistryError(f"version {target.version} is {target.status}, not READY")
    # Naming a version that held the alias before is no rollback: only --rollback (or --force with a reason)
    # bypasses the no-regression gate, so a gate is never skipped by accident.
    results = check_gates(target, current, gates, rollback=rollback)
    failed = [g for g in results if not g.passed]
    if failed and not force_reason:
        raise GateError(target.version, failed)
    action = ("rollback" if rollback else "promote") + ("-forced" if failed else "")
    event = PromotionEvent(
        when=datetime.now(timezone.utc).isoformat(timespec="seconds"), user=user or current_user(),
        action=action, model_name=model_name, alias=alias, from_version=str(current.version) if current else "",
        to_version=str(target.version), reason=(force_reason if failed else reason) or "all gates passed",
        gates=[asdict(g) for g in results])
    if dry_run:
        return event, results

    record(c, event, move=True)
    return event, results


def record(c: mlflow.MlflowClient, event: PromotionEvent, *, move: bool) -> PromotionEvent:
    """Record `event` in the promotions experiment and, with `move`, point its alias at its to_version.

    Record first, move last: the run is opened (RUNNING) with the whole event, the version tagged, the alias
    moved, the run closed (FINISHED). Whatever stops this between the steps, `reconcile` can tell what
    happened from where the alias points. Without `move` (an outcome with nothing to move), the run is opened
    and closed."""
    model_name, alias, target = event.model_name, event.alias, event.to_version
    tags = {k: str(v) for k, v in event.as_dict().items() if k not in ("gates", "run_id")}
    tags["gates"] = json.dumps(event.gates)
    run = c.create_run(_promotions_experiment(c), run_name=f"{event.action} {model_name} "
                       f"v{event.from_version or '-'} -> v{target}", tags=tags)
    if move:
        try:
            c.set_model_version_tag(model_name, target, f"last_{alias}_at", event.when)
            c.set_registered_model_alias(model_name, alias, target)
        except Exception:
            if str(getattr(alias_version(c, model_name, alias), "version", "")) != target:
                c.set_terminated(run.info.run_id, status="FAILED")  # nothing moved; else leave it to reconcile
            raise
    c.set_terminated(run.info.run_id, status="FINISHED")
    event.run_id = run.info.run_id
    return event


# --- canary releases: what the cluster decided (`distilops deploy --strategy canary --apply`) -----------------

CANARY_PREFIX = "canary-"
CANARY_PROMOTED, CANARY_ABORTED = "canary-promoted", "canary-aborted"


def record_canary(model_name: str, alias: str, *, canary: str, stable: str | None, promoted: bool, message: str,
                  user: str | None = None) -> tuple[PromotionEvent, bool]:
    """Record a canary's outcome in the promotion history; after an abort, move `alias` back to the version
    the cluster still serves. Returns the event and whether the alias moved.

    `canary`: the release version the canary ran (the alias's version when deploy rendered it); `stable`: the
    release version the cluster served before it (None: none, a first release). Promoted: `canary-promoted`,
    stable -> canary; nothing moves (the alias already names the canary). Aborted: `canary-aborted`, canary ->
    stable, and the alias moves back to stable if it still names the canary (record first, move last, as
    `promote`; one another moved since is left where they put it). Aborted with no stable version: the alias
    is left on the canary (nothing else is known to work) and the event, canary -> canary, says that the
    cluster serves none of this model's versions; the caller fails loudly."""
    c = client()
    reconcile(c, model_name, _promotions_experiment(c))
    current = alias_version(c, model_name, alias)
    holder = str(current.version) if current is not None else ""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if promoted:
        event = PromotionEvent(when, user or current_user(), CANARY_PROMOTED, model_name, alias, stable or "", canary,
                               message or "canary analysis passed: fully promoted", [])
        return record(c, event, move=False), False
    move = stable is not None and holder == canary and stable != canary
    if stable is None:
        reason = f"{message}; no stable version in the cluster: alias left on v{holder or '-'}, which it does not serve"
        target = canary
    elif holder not in (canary, stable):
        reason = f"{message}; the alias was moved to v{holder} during the canary: left there"
        target = stable
    else:
        reason = message
        target = stable
    event = PromotionEvent(when, user or current_user(), CANARY_ABORTED, model_name, alias, canary, target, reason, [])
    return record(c, event, move=move), move

"""The MLflow registry for real (SQLite store): register versions, promote behind gates, refuse worse
ones, force with a reason, roll back, read the history; a crash mid-promotion moves nothing."""

import logging

import mlflow
import pytest
from tiny import distinct, make_tiny_model

from distilops.config import PromoteConfig
from distilops.errors import GateError, RegistryError
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.release.registry import (
    TAG_VALUE_LIMIT,
    alias_version,
    choice_line,
    choice_tags,
    client,
    history,
    metrics_from_report,
    promote,
    register_version,
    version_metrics,
)
from distilops.stage import table_csv
from distilops.tracking import stage_run

NAME = "tiny-sentiment"
GATES = PromoteConfig(alias="production", min_accuracy_retention=0.97, max_accuracy_drop=0.005,
                      max_latency_p95_ms=20.0, model_name=NAME)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DISTILOPS_USER", "alice")
    monkeypatch.chdir(tmp_path)
    raw = make_tiny_model(tmp_path / "raw")
    folder = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), tmp_path / "student",
                               max_length=32, teacher="tiny-teacher")
    return folder


def register(folder, accuracy: float, latency: float = 5.0, role: str = "serving") -> str:
    """A new version: the folder is made distinct first (the registry adds no version for a folder it holds)."""
    with stage_run("register"):
        mv = register_version(distinct(folder), model_name=NAME, variant="onnx_int8", role=role,
                              tags={"data_hash": "d1"},
                              metrics={"accuracy": accuracy, "teacher_accuracy": 0.86, "latency_p95_ms": latency})
    return str(mv.version)


def test_an_identical_folder_adds_no_version_and_names_the_one_it_matched(store, caplog):
    """The same folder again (same role, variant) is the version already registered, whatever its metrics say;
    a changed byte, or another role, is a new version."""
    first = register(store, 0.85)
    with stage_run("register"), caplog.at_level(logging.INFO, logger="distilops.release.registry"):
        again = register_version(store, model_name=NAME, variant="onnx_int8", role="serving",
                                 metrics={"accuracy": 0.85, "teacher_accuracy": 0.86, "latency_p95_ms": 7.0})
    assert str(again.version) == first and len(client().search_model_versions(f"name = '{NAME}'")) == 1
    assert f"{NAME} v{first} already holds this folder" in caplog.text
    assert client().get_model_version(NAME, first).tags["folder_sha256"]
    assert register(store, 0.85, role="reference") != first  # register() changes a byte too: a new version
    with stage_run("register"):
        other_role = register_version(store, model_name=NAME, variant="onnx_int8", role="teacher",
                                      metrics={"accuracy": 0.85, "teacher_accuracy": 0.86, "latency_p95_ms": 5.0})
    assert int(other_role.version) == 3


def current() -> str | None:
    mv = alias_version(client(), NAME, "production")
    return None if mv is None else str(mv.version)


def test_versions_carry_lineage_and_metrics_and_load_as_models(store):
    version = register(store, 0.85)
    mv = client().get_model_version(NAME, version)
    assert mv.tags["role"] == "serving" and mv.tags["git_commit"] and mv.tags["data_hash"] == "d1"
    assert version_metrics(mv) == {"accuracy": 0.85, "teacher_accuracy": 0.86, "latency_p95_ms": 5.0}
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    out = model.predict(["a wonderful film", "dull"])
    assert len(out) == 2 and {o.label for o in out} <= {"rotten", "fresh"} and 0.5 <= out[0].score <= 1


def test_promote_refuse_force_rollback_and_history(store):
    v1 = register(store, 0.85)
    v2 = register(store, 0.80)                 # retention 0.80 / 0.86 = 93%: below 97%
    v3 = register(store, 0.84)                 # passes retention, but 0.01 below v1
    v4 = register(store, 0.852, latency=4.0)   # better

    promote(NAME, GATES, version=v1)
    assert current() == v1

    with pytest.raises(GateError, match=r"accuracy_retention: accuracy 0.8000 is 93.02% of its teacher's"):
        promote(NAME, GATES, version=v2)
    with pytest.raises(GateError, match=r"no_regression: accuracy 0.8400 vs production v1 0.8500 \(drop \+0.0100"):
        promote(NAME, GATES, version=v3)
    assert current() == v1  # refusals move nothing

    event, _ = promote(NAME, GATES)  # default: the newest serving version
    assert (event.from_version, event.to_version, event.action) == (v1, v4, "promote")
    assert current() == v4

    event, _ = promote(NAME, GATES, rollback=True, reason="customer complaints")
    assert (event.from_version, event.to_version, event.action) == (v4, v1, "rollback") and current() == v1

    with pytest.raises(RegistryError, match="already"):
        promote(NAME, GATES, version=v1)
    event, gates = promote(NAME, GATES, version=v2, force_reason="demo for the sales team")
    assert event.action == "promote-forced" and current() == v2
    assert [g.name for g in gates if not g.passed] == ["accuracy_retention", "no_regression"]

    events = history(NAME)
    assert [(e.action, e.from_version, e.to_version) for e in events] == [
        ("promote-forced", v1, v2), ("rollback", v4, v1), ("promote", v1, v4), ("promote", "", v1)]
    assert events[0].reason == "demo for the sales team" and events[1].reason == "customer complaints"
    assert all(e.user == "alice" and e.when for e in events)
    assert any(not g["passed"] for g in events[0].gates)


def test_naming_an_earlier_production_version_does_not_skip_the_gates(store):
    v1 = register(store, 0.85)
    v2 = register(store, 0.86)
    promote(NAME, GATES, version=v1)
    promote(NAME, GATES, version=v2)
    # v1 held production before, but naming it is no rollback: it is 1 point worse than v2, so refused.
    with pytest.raises(GateError, match=r"no_regression: accuracy 0.8500 vs production v2 0.8600"):
        promote(NAME, GATES, version=v1)
    assert current() == v2
    event, gates = promote(NAME, GATES, rollback=True)  # the explicit way back skips it, and says so
    assert event.action == "rollback" and current() == v1
    assert next(g for g in gates if g.name == "no_regression").skipped


def test_nothing_to_roll_back_to_is_clear(store):
    v1 = register(store, 0.85)
    with pytest.raises(RegistryError, match="points nowhere"):
        promote(NAME, GATES, rollback=True)
    promote(NAME, GATES, version=v1)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        promote(NAME, GATES, rollback=True)


def test_a_crash_while_moving_the_alias_leaves_state_and_history_intact(store, monkeypatch):
    v1, v2 = register(store, 0.85), register(store, 0.86)
    promote(NAME, GATES, version=v1)

    def broken(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    with monkeypatch.context() as patch, pytest.raises(ConnectionError):
        patch.setattr(mlflow.MlflowClient, "set_registered_model_alias", broken)
        promote(NAME, GATES, version=v2)
    assert current() == v1
    assert [e.to_version for e in history(NAME)] == [v1]  # the failed attempt is not a recorded move


def test_unknown_model_and_version_are_clear(store):
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        promote("nope", GATES)
    register(store, 0.85)
    with pytest.raises(RegistryError, match=r"has no version 7 \(versions: \[1\]\)"):
        promote(NAME, GATES, version=7)


def test_a_version_without_metrics_cannot_pass(store):
    with stage_run("register"):
        mv = register_version(store, model_name=NAME, role="serving", metrics={})
    with pytest.raises(GateError, match="has no"):
        promote(NAME, GATES, version=mv.version)


def test_versions_carry_the_throughput_of_any_evaluate_batch_size():
    """evaluate.batch_size 16 writes throughput_batch16: registering must not look for batch 32 only."""
    entry = {"accuracy": 0.85, "latency_p95_ms": 3.0, "throughput_batch16": 250.0, "confusion_matrix": [[1]],
             "accuracy_ci": [0.83, 0.87], "retention_ci": [0.97, 1.01], "mcnemar_vs_teacher": {"p_value": 0.4}}
    long_set = {"accuracy": 0.9, "accuracy_ci": [0.8, 0.96], "agreement_with_teacher": 0.95}
    evaluation = {"models": {"student_onnx_int8": entry, "teacher": {"accuracy": 0.86}},
                  "sets": {"long_reviews": {"models": {"student_onnx_int8": long_set}}}}
    metrics = metrics_from_report(evaluation, "student_onnx_int8")
    assert metrics["throughput_batch16"] == 250.0 and "confusion_matrix" not in metrics
    assert metrics["accuracy_retention"] == pytest.approx(0.85 / 0.86)
    assert (metrics["accuracy_low"], metrics["accuracy_retention_low"], metrics["long_reviews.accuracy_low"]) == (
        0.83, 0.97, 0.8)


def register_measured(folder, correct, *, retention_low: float = 0.99, data_hash: str = "d1") -> str:
    """A version as the register stage records it: intervals, and which test texts it got right."""
    import numpy as np

    from distilops.stats import pack_correct

    accuracy = float(np.mean(correct))
    with stage_run("register"):
        mv = register_version(distinct(folder), model_name=NAME, variant="onnx_int8", role="serving",
                              test_correct=pack_correct(correct), test_examples=len(correct),
                              tags={"data_hash": data_hash},
                              metrics={"accuracy": accuracy, "teacher_accuracy": 0.86, "latency_p95_ms": 5.0,
                                       "accuracy_low": accuracy - 0.02, "accuracy_high": accuracy + 0.02,
                                       "accuracy_retention_low": retention_low, "accuracy_retention_high": 1.02})
    return str(mv.version)


def test_retention_is_gated_on_its_interval_not_its_point_estimate(store):
    correct = [True] * 85 + [False] * 15  # 0.85: 98.8% of the teacher's 0.86 as a point estimate
    version = register_measured(store, correct, retention_low=0.96)
    with pytest.raises(GateError, match=r"accuracy_retention: .* 98.84% .* 95% interval \[96.00%, 102.00%\] "
                                        r"\(lower end needs >= 97.00%\)"):
        promote(NAME, GATES, version=version)
    assert current() is None


def test_no_regression_refuses_only_a_significant_drop(store):
    import numpy as np

    production = np.arange(1000) % 20 != 0  # 95% right
    right, wrong = np.flatnonzero(production), np.flatnonzero(~production)
    significant = production.copy()
    significant[right[:8]] = False  # 8 texts lost, none gained: p = 2 / 2^8
    noise = production.copy()
    noise[right[:12]] = False
    noise[wrong[:6]] = True  # 12 lost, 6 gained: a 0.6-point drop, but 6 of 18 is a fair coin's doing
    v1, v2, v3 = (register_measured(store, c) for c in (production, significant, noise))
    promote(NAME, GATES, version=v1)

    with pytest.raises(GateError, match=r"no_regression: accuracy 0.9420 \[0.922, 0.962\] vs production v1 0.9500 "
                                        r"\[0.930, 0.970\] \(drop \+0.0080, tolerance 0.005; McNemar on the same "
                                        r"1000 texts: 0 only the candidate gets right, 8 only production, "
                                        r"p = 0.00781, significant at 0.05\)"):
        promote(NAME, GATES, version=v2)
    event, gates = promote(NAME, GATES, version=v3)
    assert current() == v3
    assert "p = 0.238, not significant at 0.05" in next(g.detail for g in gates if g.name == "no_regression")

    worse = production.copy()
    worse[right[:20]] = False  # 0.930 vs v3's 0.944: beyond the tolerance, and on other texts nothing to pair
    other_split = register_measured(store, worse, data_hash="d2")
    with pytest.raises(GateError, match=r"not paired \(different test splits: data hashes differ\)"):
        promote(NAME, GATES, version=other_split)


KILLED_PROMOTE = """
import sys, time
import mlflow
from distilops.config import PromoteConfig
from distilops.release.registry import promote

step = sys.argv[1]  # stop the real process at one step of the promotion, then get killed there

def stop_here(*args, **kwargs):
    print("STOPPED", flush=True)
    time.sleep(600)

original = getattr(mlflow.MlflowClient, step)
if step == "set_terminated":  # the alias has moved; the event is never closed
    mlflow.MlflowClient.set_terminated = stop_here
else:  # killed before the alias moves
    mlflow.MlflowClient.set_registered_model_alias = stop_here
promote("tiny-sentiment", PromoteConfig(model_name="tiny-sentiment", max_latency_p95_ms=20.0), version=sys.argv[2])
"""


def kill_promote_at(step: str, version: str) -> None:
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", KILLED_PROMOTE, step, version], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STOPPED", (line, proc.stderr.read() if proc.poll() is not None else "")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_promote_killed_after_the_alias_moved_is_recorded_and_can_be_rolled_back(store):
    v1, v2 = register(store, 0.85), register(store, 0.86)
    promote(NAME, GATES, version=v1)
    kill_promote_at("set_terminated", v2)  # a real process, killed after the move, before closing the event
    assert current() == v2
    assert [(e.from_version, e.to_version) for e in history(NAME)] == [(v1, v2), ("", v1)]  # reconciled
    event, _ = promote(NAME, GATES, rollback=True)  # so the way back is known
    assert (event.from_version, event.to_version) == (v2, v1) and current() == v1


def test_a_promote_killed_before_the_alias_moved_leaves_everything_as_it_was(store, monkeypatch):
    import distilops.release.registry as registry

    v1, v2 = register(store, 0.85), register(store, 0.86)
    promote(NAME, GATES, version=v1)
    kill_promote_at("set_registered_model_alias", v2)
    monkeypatch.setattr(registry, "STALE_SECONDS", 0)  # the killed event is old enough to call a crash
    assert current() == v1 and [e.to_version for e in history(NAME)] == [v1]
    c = client()
    runs = c.search_runs([c.get_experiment_by_name("distilops-promotions").experiment_id],
                         f"tags.to_version = '{v2}'")
    assert [r.info.status for r in runs] == ["FAILED"] and "never moved" in runs[0].data.tags["reconciled"]
    event, _ = promote(NAME, GATES, version=v2)  # and the promotion can simply be run again
    assert current() == v2 and event.from_version == v1


def test_the_teacher_carries_its_own_metrics_and_every_model_its_agreement_interval():
    teacher = {"accuracy": 0.86, "latency_p95_ms": 9.0, "accuracy_ci": [0.84, 0.88], "agreement_with_teacher": 1.0,
               "agreement_with_teacher_ci": [1.0, 1.0]}  # the baseline: no retention, no McNemar against itself
    student = {"accuracy": 0.85, "latency_p95_ms": 3.0, "accuracy_ci": [0.83, 0.87], "retention_ci": [0.97, 1.01],
               "mcnemar_vs_teacher": {"p_value": 0.4}, "agreement_with_teacher": 0.91,
               "agreement_with_teacher_ci": [0.89, 0.93]}
    evaluation = {"models": {"teacher": teacher, "student_onnx_int8": student}}
    of_teacher = metrics_from_report(evaluation, "teacher")
    assert of_teacher["accuracy_retention"] == 1.0 and "accuracy_retention_low" not in of_teacher
    assert "mcnemar_vs_teacher_p" not in of_teacher and of_teacher["agreement_with_teacher_low"] == 1.0
    of_student = metrics_from_report(evaluation, "student_onnx_int8")
    assert (of_student["agreement_with_teacher"], of_student["agreement_with_teacher_low"],
            of_student["agreement_with_teacher_high"]) == (0.91, 0.89, 0.93)


def searched_report(n_points: int = 4) -> dict:
    """metrics/distill.json's choice and frontier as the distill stage writes them (frontier.choose and
    frontier_rows on hand-made points: trial 3, 4 layers, 2.4x a 7.5 ms teacher, is chosen within the tolerance)."""
    from distilops.config import ChooseRule
    from distilops.pipeline.frontier import Point, choice_report, choose, frontier_rows

    def point(trial: int, layers: int, val: float, general: float, latency: float) -> Point:
        return Point(trial, layers, {"temperature": 3.1, "alpha": 0.81, "learning_rate": 1.2e-4}, val, general,
                     latency, 7.5 / latency, val - 0.05)

    points = [point(0, 2, 0.80, 0.78, 1.5), point(1, 3, 0.84, 0.82, 2.5), point(3, 4, 0.885, 0.863, 3.1),
              point(4, 5, 0.88, 0.874, 3.7)]
    points += [point(10 + i, 5, 0.87, 0.86, 3.8 + i) for i in range(n_points - 4)]  # dominated: off the front
    rule = ChooseRule(min_speedup=1.5, tolerance=0.005)
    chosen, reason = choose(points, rule)
    return {"student_layers": chosen.student_layers, "teacher_latency_ms": 7.5,
            "choice": choice_report(chosen, reason, rule), "frontier": frontier_rows(points, chosen)}


def test_the_choice_of_depth_becomes_tags():
    import json

    report = searched_report(n_points=6)
    tags = choice_tags(report)
    assert set(tags) == {"distill.student_layers", "distill.choice", "distill.trial", "distill.rule",
                         "distill.frontier"}
    assert (tags["distill.student_layers"], tags["distill.trial"]) == ("4", "3")
    assert tags["distill.choice"] == report["choice"]["reason"] and tags["distill.choice"].startswith("trial 3: 4 ")
    assert json.loads(tags["distill.rule"]) == {"min_speedup": 1.5, "max_latency_ms": 0.0, "min_agreement": 0.0,
                                                "tolerance": 0.005}
    assert " " not in tags["distill.rule"]  # compact
    front = json.loads(tags["distill.frontier"])  # the Pareto points only, fastest first, rounded
    assert [p["trial"] for p in front] == [0, 1, 3, 4]
    assert front[2] == {"trial": 3, "layers": 4, "latency_ms": 3.1, "speedup": 2.4194, "val_agreement": 0.885,
                        "general_agreement": 0.863}
    assert choice_line(tags) == ("chosen: 4 layers (trial 3) of the frontier, 2.4x the teacher; rule min_speedup 1.5, "
                                 "tolerance 0.005")


def test_choice_tags_stay_under_mlflows_limit_and_older_reports_still_register():
    import json

    report = searched_report()
    report["choice"]["reason"] = "x" * 6000
    report["frontier"] = [{**row, "trial": 100 + i, "pareto": True, "latency_ms": 1 + i / 100}
                          for i, row in enumerate(report["frontier"] * 30)]
    report["frontier"][-1]["trial"] = report["choice"]["trial"] = 7  # the chosen point is the slowest: kept
    tags = choice_tags(report)
    assert all(len(v) <= TAG_VALUE_LIMIT for v in tags.values()) and tags["distill.choice"].endswith("...")
    front = json.loads(tags["distill.frontier"])
    assert 10 < len(front) < 120 and front[-1]["trial"] == 7 and front[0]["trial"] == 100

    fixed = {"student_layers": 3, "choice": {"searched": False, "student_layers": 3, "trial": 2,
                                             "reason": "depth fixed at 3 layers by distill.student_layers"},
             "frontier": []}
    assert choice_tags(fixed) == {"distill.student_layers": "3", "distill.trial": "2",
                                  "distill.choice": "depth fixed at 3 layers by distill.student_layers"}
    assert choice_line(choice_tags(fixed)) == "chosen: depth fixed at 3 layers by distill.student_layers"
    assert choice_tags({"student_layers": 3, "best_trial": 0}) == {"distill.student_layers": "3"}  # before "choice"
    assert choice_tags({}) == {} and choice_line({}) == ""


def test_choice_line_fits_the_versions_listing_with_every_limit_set():
    tags = choice_tags(searched_report())
    tags["distill.rule"] = '{"min_speedup":1.5,"max_latency_ms":4.25,"min_agreement":0.875,"tolerance":0.005}'
    line = choice_line(tags)
    assert line == ("chosen: 4 layers (trial 3), 2.4x the teacher; rule speedup>=1.5 latency<=4.25ms fidelity>=0.875 "
                    "tol 0.005")
    assert len(choice_line(tags, width=60)) == 60 and choice_line(tags, width=60).endswith("...")
    tags["distill.rule"] = '{"min_speedup":1.5,"max_latency_ms":4.25,"min_agreement":0,"tolerance":0.005}'
    assert choice_line(tags) == ("chosen: 4 layers (trial 3), 2.4x the teacher; rule min_speedup 1.5, "
                                 "max_latency_ms 4.25, tolerance 0.005")  # only "of the frontier" had to go


def test_the_frontier_csv_has_every_column_of_every_row():
    rows = searched_report()["frontier"]
    text = table_csv([*rows, {**rows[0], "trial": 9, "cosine_weight": 0.5}])
    lines = text.splitlines()
    assert lines[0] == ("trial,student_layers,latency_ms,speedup,val_agreement,general_agreement,fidelity,"
                        "val_accuracy,pareto,chosen,temperature,alpha,learning_rate,cosine_weight")
    assert len(lines) == 6 and lines[3].startswith("3,4,3.1,") and ",True,True," in lines[3]
    assert lines[1].endswith(",") and lines[5].endswith(",0.5")
    assert table_csv([], ("trial", "fidelity")) == "trial,fidelity\n"  # no rows: the header says what is missing


def test_versions_carry_and_list_the_label_free_agreement_of_every_unlabelled_set(store, tmp_path):
    """eval.<set>.agreement_with_teacher[_low|_high] for every unlabelled set; `versions` shows them beside the
    test split's accuracy and agreement, in lines under 120 columns."""
    from typer.testing import CliRunner

    from distilops.cli import app

    student = {"accuracy": 0.85, "latency_p95_ms": 3.0, "size_mb": 22.1, "accuracy_ci": [0.83, 0.87],
               "retention_ci": [0.97, 1.01], "mcnemar_vs_teacher": {"p_value": 0.4}, "agreement_with_teacher": 0.894,
               "agreement_with_teacher_ci": [0.877, 0.911]}
    general = {"agreement_with_teacher": 0.87, "agreement_with_teacher_ci": [0.85, 0.89]}
    long_set = {"accuracy": 0.9, "accuracy_ci": [0.8, 0.96], "agreement_with_teacher": 0.95}
    evaluation = {"models": {"student_onnx_int8": student, "teacher": {"accuracy": 0.86}},
                  "sets": {"long_reviews": {"models": {"student_onnx_int8": long_set}}},
                  "unlabeled_sets": {"general_text": {"texts": 2000, "source": "general_english",
                                                      "models": {"student_onnx_int8": general}}}}
    metrics = metrics_from_report(evaluation, "student_onnx_int8")
    assert (metrics["general_text.agreement_with_teacher"], metrics["general_text.agreement_with_teacher_low"],
            metrics["general_text.agreement_with_teacher_high"]) == (0.87, 0.85, 0.89)
    assert "long_reviews.agreement_with_teacher_low" not in metrics  # labelled sets: accuracy carries the interval
    with stage_run("register"):
        mv = register_version(store, model_name=NAME, variant="onnx_int8", role="serving", device="cpu",
                              metrics=metrics, tags=choice_tags(searched_report()))
    assert client().get_model_version(NAME, mv.version).tags["eval.general_text.agreement_with_teacher_low"] == "0.85"

    (tmp_path / "params.yaml").write_text(f"model_name: {NAME}\npromote: {{}}\n")
    listed = CliRunner().invoke(app, ["versions"])
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].startswith(f"v{mv.version} ") and "onnx_int8" in lines[0] and "p95  3.00 ms" in lines[0]
    assert lines[1].split() == ["test", "acc", "0.850", "[0.830,", "0.870]", "retention", "98.8%", "[97.0%,",
                                "101.0%]", "agree", "0.894", "[0.877,", "0.911]"]
    assert lines[2].split() == ["long_reviews", "acc", "0.900", "[0.800,", "0.960]",
                                "general_text", "agree", "0.870", "[0.850,", "0.890]"]
    assert lines[3] == ("      chosen: 4 layers (trial 3) of the frontier, 2.4x the teacher; rule min_speedup 1.5, "
                        "tolerance 0.005")
    assert all(len(line) <= 120 for line in lines)


@pytest.mark.slow
def test_the_register_stage_stores_references_and_names_the_release_shadow(store, tmp_path):
    """The register stage on tiny real folders and a real evaluation report: the served folders carry their
    reference, the teacher's ONNX export is a version of its own (role teacher), every version names it."""
    import json
    import shutil
    from pathlib import Path

    import pandas as pd
    from conftest import load_stage
    from tiny import make_reviews
    from typer.testing import CliRunner

    from distilops import paths
    from distilops.cli import app
    from distilops.config import EvaluateConfig
    from distilops.pipeline.distill import downstream_report
    from distilops.pipeline.evaluate import run
    from distilops.pipeline.quantize import build, export_teacher
    from distilops.release.registry import SHADOW_TAG, latest_serving_version
    from distilops.serving.folder import find_model_folder, read_meta
    from distilops.stage import write_json

    shutil.copytree(store, paths.STUDENT)
    quantized = {v: build(v, paths.STUDENT, paths.QUANTIZED) for v in ("onnx_int8", "onnx_fp16")}
    raw = make_tiny_model(tmp_path / "raw_teacher", seed=1)
    teacher = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), paths.TEACHER, max_length=32,
                                role="teacher", source_model="tiny")
    export_teacher(teacher, paths.TEACHER_ONNX)
    frame = make_reviews(n_movies=6, per_movie=4)
    test = frame[frame["category"] != "plot"].assign(label=lambda f: (f["category"] == "fresh").astype(int))
    cfg = EvaluateConfig(speed_texts=8, latency_samples=2, repeats=1, bootstrap_resamples=100, threads=1)
    report = run(cfg, {"teacher": teacher, "student": paths.STUDENT, "student_onnx_int8": quantized["onnx_int8"],
                       "student_onnx_fp16": quantized["onnx_fp16"]}, pd.DataFrame(test), {}, ["rotten", "fresh"]).report
    write_json(paths.metrics_file("evaluate"), report)
    write_json(paths.metrics_file("quantize"), {name: {"accepted": True, "reason": "ok"}
                                                for name in ("onnx_int8", "onnx_fp16", "teacher_onnx")})
    # the test built dynamic int8 (no calibration texts), so that is what the CPU serves
    (tmp_path / "params.yaml").write_text(f"model_name: {NAME}\nmax_windows: 4\n"
                                          "register: {serving: {cpu: onnx_int8}}\npromote: {}\n")
    distill = searched_report()
    write_json(paths.metrics_file("distill"), distill)
    chosen = downstream_report(distill)  # what register reads: the point, not the rule that picked it
    write_json(paths.metrics_file("distill_choice"), chosen)

    load_stage("register").main()
    registered = json.loads(paths.metrics_file("register").read_text())
    versions = {key: str(entry["version"]) for key, entry in registered["versions"].items()}
    shadow = versions["teacher_onnx_fp32"]
    assert registered["shadow_version"] == int(shadow) and set(versions) == {
        "student", "onnx_int8@cpu", "onnx_fp16@gpu", "teacher_onnx_fp32"}
    assert registered["versions"]["teacher_onnx_fp32"] == {"version": int(shadow), "role": "teacher", "device": "",
                                                           "evaluated_as": "teacher"}
    c = client()
    tags = {key: c.get_model_version(NAME, v).tags for key, v in versions.items()}
    assert all(t[SHADOW_TAG] == shadow for t in tags.values())  # every version of the release names its teacher
    # the student and the served versions say which depth was chosen and why; the teacher's was not chosen
    assert all(tags[k]["distill.choice"] == chosen["choice"]["reason"] and tags[k]["distill.student_layers"] == "4"
               for k in ("student", "onnx_int8@cpu", "onnx_fp16@gpu"))
    assert not any(key.startswith("distill.") for key in tags["teacher_onnx_fp32"])
    run_id = c.get_model_version(NAME, versions["student"]).run_id
    # the table only: the plot draws the rule, and stays with the distill run
    assert [a.path for a in c.list_artifacts(run_id, "frontier")] == ["frontier/frontier.csv"]
    logged = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="frontier/frontier.csv",
                                                 dst_path=str(tmp_path / "logged"))
    assert Path(logged).read_text().count("\n") == 1 + len(distill["frontier"])
    teacher_tags = tags["teacher_onnx_fp32"]
    assert (teacher_tags["role"], teacher_tags["variant"], teacher_tags["format"]) == ("teacher", "teacher_onnx_fp32",
                                                                                       "onnx")
    assert "device" not in teacher_tags and "eval.accuracy_retention_low" not in teacher_tags
    assert float(teacher_tags["eval.accuracy"]) == pytest.approx(report["models"]["teacher"]["accuracy"])
    served = report["models"]["student_onnx_int8"]
    assert float(tags["onnx_int8@cpu"]["eval.agreement_with_teacher_low"]) == pytest.approx(
        served["agreement_with_teacher_ci"][0])
    assert float(tags["onnx_int8@cpu"]["eval.agreement_with_teacher_high"]) == pytest.approx(
        served["agreement_with_teacher_ci"][1])

    def meta(version: str) -> dict:
        return read_meta(find_model_folder(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}",
                                                                               dst_path=str(tmp_path / version))))

    assert meta(versions["onnx_int8@cpu"])["reference"] == served["reference"]
    assert meta(versions["onnx_fp16@gpu"])["reference"] == report["models"]["student_onnx_fp16"]["reference"]
    shadow_meta = meta(shadow)
    assert "reference" not in shadow_meta and shadow_meta["max_windows"] == 4 and shadow_meta["format"] == "onnx"

    # The teacher is the newest version, yet never what `promote` picks by default; `versions` shows its role.
    assert str(latest_serving_version(c, NAME).version) == versions["onnx_int8@cpu"]
    event, _ = promote(NAME, GATES, dry_run=True, force_reason="tiny random models")
    assert event.to_version == versions["onnx_int8@cpu"]
    listed = CliRunner().invoke(app, ["versions"])
    assert listed.exit_code == 0, listed.output
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith(f"v{shadow} ")]
    assert "teacher_onnx_fp32 teacher" in line and f"shadow v{shadow}" in line


def test_canary_outcomes_are_recorded_and_an_abort_moves_the_alias_back(store):
    """record_canary (what `deploy --strategy canary --apply` calls with what the cluster decided)."""
    from distilops.release.registry import record_canary

    v1, v2, v3 = register(store, 0.85), register(store, 0.86), register(store, 0.86)
    promote(NAME, GATES, version=v1)
    event, moved = record_canary(NAME, "production", canary=v1, stable=None, promoted=True, message="")
    assert (event.action, event.from_version, event.to_version, moved) == ("canary-promoted", "", v1, False)
    assert event.reason == "canary analysis passed: fully promoted"

    promote(NAME, GATES, version=v2)
    event, moved = record_canary(NAME, "production", canary=v2, stable=v1, promoted=False,
                                 message="RolloutAborted: error-ratio failed")
    assert (event.action, event.from_version, event.to_version, moved) == ("canary-aborted", v2, v1, True)
    assert current() == v1 and event.reason == "RolloutAborted: error-ratio failed"

    promote(NAME, GATES, version=v3)  # someone moved the alias on while v2's canary ran: it stays
    event, moved = record_canary(NAME, "production", canary=v2, stable=v1, promoted=False, message="aborted")
    assert not moved and current() == v3 and f"moved to v{v3} during the canary: left there" in event.reason

    # a first release aborted: nothing else is known to serve, so the alias stays, and the event says so
    event, moved = record_canary(NAME, "production", canary=v3, stable=None, promoted=False, message="aborted")
    assert not moved and current() == v3 and (event.from_version, event.to_version) == (v3, v3)
    assert "no stable version in the cluster" in event.reason
    actions = [e.action for e in history(NAME)]
    assert actions == ["canary-aborted", "canary-aborted", "promote", "canary-aborted", "promote", "canary-promoted",
                       "promote"]
    rolled, _ = promote(NAME, GATES, rollback=True)  # by promotions only: v3 came after v1
    assert (rolled.from_version, rolled.to_version) == (v3, v1)

"""The distill stage's choice, as the library makes it (pipeline/distill.py) from a real Optuna study: the frontier
table and figure, the report's "choice", and the outputs that say there is no frontier while depth is fixed."""

from __future__ import annotations

import mlflow
import optuna
import pandas as pd
import pytest

from distilops.config import DistillConfig
from distilops.errors import TuningError
from distilops.pipeline import distill, frontier
from distilops.pipeline.tuning import DIRECTIONS
from distilops.tracking import stage_run

PARAMS = {"temperature": 3.1, "alpha": 0.81, "learning_rate": 1.2e-4}
DISTRIBUTIONS = {"student_layers": optuna.distributions.IntDistribution(2, 5),
                 **{k: optuna.distributions.FloatDistribution(1e-5, 10) for k in PARAMS}}


@pytest.fixture()
def run(tmp_path, monkeypatch):
    """The distill stage's MLflow run, in a store of this test's own (stage_run points MLflow at it and sets the
    experiment: what an earlier test left set applies to another store)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with stage_run("distill") as active:
        yield active


def depth_study(points: list[tuple[int, float, float, float]]) -> optuna.Study:
    """A depth search's study holding complete trials (layers, val agreement, general agreement, latency ms)."""
    study = optuna.create_study(directions=list(DIRECTIONS))
    for layers, val, general, latency in points:
        study.add_trial(optuna.trial.create_trial(
            params={"student_layers": layers, **PARAMS}, distributions=DISTRIBUTIONS, values=[val, general, latency],
            user_attrs={"speedup": 7.5 / latency, "val_accuracy": val - 0.05}))
    return study


def test_a_searched_depth_is_chosen_by_the_rule_and_recorded(run, tmp_path):
    study = depth_study([(2, 0.80, 0.78, 1.5), (3, 0.85, 0.83, 2.5), (4, 0.885, 0.863, 3.1), (5, 0.88, 0.874, 3.7)])
    cfg = DistillConfig(search={"student_layers": [2, 5]}, choose={"min_speedup": 2.2, "tolerance": 0.005})
    choice = distill.choose_point(study, cfg, tmp_path / "plots")
    assert choice.trial.number == 2 and choice.trial.params["student_layers"] == 4
    points = distill.frontier_points(study)
    chosen, reason = frontier.choose(points, cfg.choose)
    assert choice.report == frontier.choice_report(chosen, reason, cfg.choose) and choice.report["searched"]
    table = pd.read_csv(tmp_path / "plots" / "frontier.csv")
    assert table.to_dict("records") == choice.rows == frontier.frontier_rows(points, chosen)
    assert (tmp_path / "plots" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    logged = mlflow.get_run(run.info.run_id).data
    assert logged.metrics["chosen_fidelity"] == pytest.approx(chosen.fidelity)
    assert logged.tags["distill.choice"] == reason


def test_a_fixed_depth_writes_outputs_that_say_there_is_no_frontier(run, tmp_path):
    study = optuna.create_study(direction="maximize")
    for value in (0.81, 0.84, 0.83):
        study.add_trial(optuna.trial.create_trial(params=PARAMS, value=value, distributions={
            k: d for k, d in DISTRIBUTIONS.items() if k in PARAMS}))
    cfg = DistillConfig(search={"student_layers": [3, 3]})
    choice = distill.choose_point(study, cfg, tmp_path / "plots")
    assert choice.trial.number == 1 and choice.rows == [] and choice.report["searched"] is False
    assert choice.report["reason"] == ("depth fixed (the configured layers: distill.search.student_layers is "
                                       "[3, 3]); trial 1 has the best validation accuracy, 0.8400")
    assert (tmp_path / "plots" / "frontier.csv").read_text() == "trial,student_layers,latency_ms,fidelity\n"
    assert (tmp_path / "plots" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert distill.trial_val_accuracy(choice.trial) == 0.84


def test_a_study_with_no_complete_trial_is_a_clear_error(run, tmp_path):
    study = optuna.create_study(directions=list(DIRECTIONS))
    study.add_trial(optuna.trial.create_trial(params={"student_layers": 2, **PARAMS}, distributions=DISTRIBUTIONS,
                                              state=optuna.trial.TrialState.PRUNED))
    with pytest.raises(TuningError, match="none of its 1 trial"):
        distill.choose_point(study, DistillConfig(search={"student_layers": [2, 5]}), tmp_path / "plots")

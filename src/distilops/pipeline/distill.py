"""What the distill stage does after its study: choose the trial the final student copies (a point of the depth
frontier, or the best trial while depth is fixed), record the choice and the study as plots, train the final
student on all training data with that trial's parameters, and sum it all up for metrics/distill.json.

stages/distill.py reads params, calls these in order and writes the outputs.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import torch
from matplotlib.figure import Figure
from optuna.visualization import matplotlib as optuna_plots

from distilops import paths, stats
from distilops.config import DistillConfig
from distilops.pipeline import frontier
from distilops.pipeline.distributed import SINGLE, World
from distilops.pipeline.losses import UNLABELLED
from distilops.pipeline.modeling import build_student, count_parameters, num_layers
from distilops.pipeline.served_latency import TEACHER
from distilops.pipeline.training import TrainResult, TrainSettings, seed_everything, train
from distilops.pipeline.tuning import (
    LATENCY_ATTR,
    DistillInputs,
    TrialParams,
    best_trial,
    complete_trials,
    distill_loss_fn,
    layer_targets,
    params_of,
    pruning_summary,
    searches_depth,
)
from distilops.stage import table_csv

log = logging.getLogger(__name__)
NO_FRONTIER_COLUMNS = ("trial", "student_layers", "latency_ms", "fidelity")  # the empty table's header


@dataclass
class Choice:
    trial: optuna.trial.FrozenTrial  # the trial the final student copies
    report: dict  # metrics/distill.json's "choice": searched or not, why, and (searched) the rule and the point
    rows: list[dict]  # the frontier, one row per complete trial ([] while depth is fixed)


def note_figure(text: str) -> Figure:
    """A small figure that only says `text`: what stands in for a plot that cannot be drawn."""
    figure = Figure(figsize=(6, 1.5))  # no pyplot: no global figure state, no GUI backend
    figure.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=8)
    return figure


def write_no_frontier(reason: str, folder: Path) -> None:
    """The frontier outputs DVC expects, saying there is none: an empty table and a figure with the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "frontier.csv").write_text(table_csv([], NO_FRONTIER_COLUMNS))
    note_figure(f"no depth frontier: {reason}").savefig(folder / "frontier.png", dpi=110)


def frontier_points(study: optuna.Study) -> list[frontier.Point]:
    """Every complete trial of a depth-searching study as a point of the frontier."""
    return [frontier.Point(trial=t.number, student_layers=t.params["student_layers"],
                           params={k: v for k, v in t.params.items() if k != "student_layers"},
                           val_agreement=t.values[0], general_agreement=t.values[1], latency_ms=t.values[2],
                           speedup=t.user_attrs["speedup"], val_accuracy=t.user_attrs["val_accuracy"])
            for t in complete_trials(study)]


def choose_point(study: optuna.Study, cfg: DistillConfig, folder: Path) -> Choice:
    """The trial the final student copies, why, and the frontier (table and plot in `folder`, MLflow artifacts and
    chosen_* metrics of the active run). A clear error when every trial was pruned or diverged."""
    if not searches_depth(cfg):
        top = best_trial(study)
        layers = params_of(top, cfg).student_layers
        reason = (f"depth fixed ({layers or 'the configured'} layers: distill.search.student_layers is "
                  f"{cfg.search.student_layers}); trial {top.number} has the best validation accuracy, {top.value:.4f}")
        write_no_frontier(reason, folder)
        return Choice(top, {"searched": False, "reason": reason, "trial": top.number}, [])
    points = frontier_points(study)
    chosen, reason = frontier.choose(points, cfg.choose)
    rows = frontier.frontier_rows(points, chosen)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "frontier.csv").write_text(table_csv(rows))
    frontier.plot_frontier(points, chosen, folder / "frontier.png", rule=cfg.choose)
    for name in ("frontier.csv", "frontier.png"):
        mlflow.log_artifact(str(folder / name), artifact_path="frontier")
    choice = frontier.choice_report(chosen, reason, cfg.choose)
    mlflow.log_metrics({f"chosen_{k}": v for k, v in choice.items() if isinstance(v, float)})
    mlflow.set_tag("distill.choice", reason[:5000])
    return Choice(study.trials[chosen.trial], choice, rows)


def log_study_plots(study: optuna.Study, folder: Path) -> None:
    """Optimisation history and parameter importances, as files and MLflow artifacts (a depth search's: of
    fidelity, the mean of its two agreements), and the trials as study/trials.csv. Optuna draws them with pyplot:
    the caller picks a backend without a display (the stage: Agg)."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        target = ({"target": lambda t: frontier.fidelity(t.values[0], t.values[1]), "target_name": "fidelity"}
                  if len(study.directions) > 1 else {})
        for name, plot in (("optimization_history", optuna_plots.plot_optimization_history),
                           ("param_importances", optuna_plots.plot_param_importances)):
            try:
                axes = plot(study, **target)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            except (ValueError, RuntimeError) as exc:  # importances need >= 2 complete trials
                log.info("no %s plot: %s", name, exc)
                figure = note_figure(f"no {name.replace('_', ' ')}: {exc}")
            figure.tight_layout()
            figure.savefig(folder / f"{name}.png", dpi=110)
            close(figure)
            mlflow.log_artifact(str(folder / f"{name}.png"), artifact_path="study")
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), "study/trials.csv")


def close(figure: Figure) -> None:
    """Release a figure optuna drew with pyplot (pyplot keeps it until closed); ours are pyplot-free."""
    from matplotlib import pyplot as plt

    if plt.fignum_exists(getattr(figure, "number", -1)):
        plt.close(figure)


@dataclass
class FinalStudent:
    model: torch.nn.Module
    result: TrainResult
    settings: TrainSettings  # its checkpoints are cleared once the outputs are written


def train_final(cfg: DistillConfig, inputs: DistillInputs, best: TrialParams, world: World = SINGLE) -> FinalStudent:
    """The student trained on all training data with `best`'s parameters, checkpointed (an interrupted run
    resumes); validation accuracy (and the layer-wise parts) logged to the active run (by rank 0)."""
    seed_everything(cfg.seed)
    student = build_student(inputs.teacher, best.student_layers) if best.student_layers else inputs.make_student()
    layers = layer_targets(best, inputs.teacher, student)  # None while the layer-wise terms are off
    settings = TrainSettings.from_config(
        cfg, epochs=cfg.final_epochs, learning_rate=best.learning_rate,
        checkpoint_dir=paths.CHECKPOINTS / "student", progress="student",
        fingerprint={"stage": "distill-final", "study": inputs.study_name, **vars(best), "epochs": cfg.final_epochs,
                     "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
                     "warmup_ratio": cfg.warmup_ratio})

    def on_eval(step: int, acc: float) -> None:
        mlflow.log_metric("final_val_accuracy", acc, step=step)
        if layers is not None:
            layers.log(step)

    result = train(student, inputs.data["train"], inputs.data["validation"], inputs.tokenizer.pad_token_id, settings,
                   distill_loss_fn(best, layers), on_eval=on_eval, extra=layers.projection if layers else None,
                   world=world)
    return FinalStudent(student, result, settings)


def trial_val_accuracy(trial: optuna.trial.FrozenTrial) -> float | None:
    """The chosen trial's validation accuracy: its value (depth fixed) or the attribute a depth search records."""
    return trial.user_attrs.get("val_accuracy", trial.value if len(trial.values) == 1 else None)


def report(cfg: DistillConfig, study: optuna.Study, choice: Choice, inputs: DistillInputs,
           final: FinalStudent) -> dict:
    """metrics/distill.json: the study, the chosen trial and why, the final student against its teacher, the
    frontier."""
    best, data = params_of(choice.trial, cfg), inputs.data
    metrics = {
        "study_name": inputs.study_name,
        "best_trial": choice.trial.number,
        "best_trial_val_accuracy": trial_val_accuracy(choice.trial),
        "best_params": vars(best),
        **pruning_summary(study),
        "val_accuracy": final.result.best_accuracy,
        "teacher_val_accuracy": float((data["validation"].teacher_logits.argmax(-1)
                                       == data["validation"].labels).mean()),
        "final_train_seconds": round(final.result.seconds, 1),
        "train_examples": len(data["train"]),
        "transfer_examples": int((data["train"].labels == UNLABELLED).sum()),  # teacher-labelled only
        "student_layers": num_layers(final.model),
        "teacher_layers": num_layers(inputs.teacher),
        "student_parameters": count_parameters(final.model),
        "teacher_parameters": count_parameters(inputs.teacher),
    }
    metrics["val_accuracy_retention"] = round(stats.retention(metrics["val_accuracy"],
                                                              metrics["teacher_val_accuracy"]), 4)
    if LATENCY_ATTR in study.user_attrs:
        metrics["teacher_latency_ms"] = study.user_attrs[LATENCY_ATTR][TEACHER]
    metrics["choice"] = {**choice.report, "student_layers": metrics["student_layers"]}
    metrics["frontier"] = choice.rows
    return metrics

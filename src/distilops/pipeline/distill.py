"""What the distill stage does after its study: choose the trial the final student copies (a point of the depth
frontier, or the best trial while depth is fixed), record the choice and the study as plots, train the final
student on all training data with that trial's parameters (or reuse the one already trained with them), and sum it
all up for metrics/distill.json and, for the stages downstream, metrics/distill_choice.json.

stages/distill.py reads params, calls these in order and writes the outputs.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import optuna
import torch
import transformers
from matplotlib.figure import Figure
from optuna.visualization import matplotlib as optuna_plots

from distilops import paths, stats
from distilops.config import DistillConfig
from distilops.hashing import file_sha256, json_sha256
from distilops.pipeline import frontier, served_latency
from distilops.pipeline.distributed import SINGLE, World, broadcast_object
from distilops.pipeline.losses import UNLABELLED
from distilops.pipeline.modeling import build_student, count_parameters, load_classifier, num_layers, save_model_folder
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
from distilops.serving.folder import write_meta
from distilops.stage import table_csv
from distilops.tracking import data_hash

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
    """Every complete trial of a depth-searching study as a point of the frontier. Latency and speedup are the
    study's stored measurement of the trial's depth (with its quartiles), so a study measured again (another
    method) is read with its new numbers; a depth it does not hold keeps the trial's own values."""
    measured = study.user_attrs.get(LATENCY_ATTR, {})

    def timing(t: optuna.trial.FrozenTrial) -> dict:
        depth = str(t.params["student_layers"])
        if depth not in measured.get("speedup", {}):
            return {"latency_ms": t.values[2], "speedup": t.user_attrs["speedup"]}
        spread = measured["speedup"][depth]
        return {"latency_ms": served_latency.latency_ms(measured, depth), "speedup": spread["p50"],
                "speedup_low": spread["p25"], "speedup_high": spread["p75"]}

    return [frontier.Point(trial=t.number, student_layers=t.params["student_layers"],
                           params={k: v for k, v in t.params.items() if k != "student_layers"},
                           val_agreement=t.values[0], general_agreement=t.values[1],
                           val_accuracy=t.user_attrs["val_accuracy"], **timing(t))
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
    reused: bool = False  # copied from the last final student trained with the same key (no training)


# The last final student trained, kept beside the training checkpoints (git-ignored, not a DVC output, so `dvc repro`
# never deletes it): a rerun whose choice is the point it was trained from copies it instead of training again.
FINAL_KEPT = paths.CHECKPOINTS / "student-final"
# The code that trains the final student or writes its folder: an edit to any of them trains it again.
TRAINING_CODE = ("pipeline/batching.py", "pipeline/distill.py", "pipeline/losses.py", "pipeline/modeling.py",
                 "pipeline/training.py", "pipeline/tuning.py", "serving/folder.py")


def final_settings(cfg: DistillConfig, inputs: DistillInputs, best: TrialParams) -> TrainSettings:
    return TrainSettings.from_config(
        cfg, epochs=cfg.final_epochs, learning_rate=best.learning_rate,
        checkpoint_dir=paths.CHECKPOINTS / "student", progress="student",
        fingerprint={"stage": "distill-final", "study": inputs.study_name, **vars(best), "epochs": cfg.final_epochs,
                     "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
                     "warmup_ratio": cfg.warmup_ratio})


def final_key(cfg: DistillConfig, inputs: DistillInputs, best: TrialParams) -> str:
    """What the final student is a function of: the study (its name hashes the trial settings, teacher and data),
    the chosen parameters, the final training's settings, the data, the code that trains and the libraries."""
    package = Path(__file__).resolve().parents[1]
    return json_sha256({"training": final_settings(cfg, inputs, best).fingerprint, "seed": cfg.seed,
                        "max_length": cfg.max_length, "data_hash": data_hash(),
                        "teacher_sha256": inputs.fingerprint.get("teacher"),
                        "code": {name: file_sha256(package / name) for name in TRAINING_CODE},
                        "torch": torch.__version__, "transformers": transformers.__version__})


def kept_final(key: str, kept: Path = FINAL_KEPT) -> dict | None:
    """The kept final student's training result when it was trained under `key`; None otherwise."""
    try:
        record = json.loads((kept / "final.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record["result"] if record.get("key") == key and (kept / "model").is_dir() else None


def keep_final(folder: Path, key: str, result: TrainResult, kept: Path = FINAL_KEPT) -> None:
    """Keep a copy of the final student's folder under `key`, replacing the last one; written beside it first and
    renamed, so a crash leaves the old copy or the new one, never half of one."""
    staging = kept.with_name(kept.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging / "model")
    (staging / "final.json").write_text(json.dumps({"key": key, "result": asdict(result)}, indent=2) + "\n")
    shutil.rmtree(kept, ignore_errors=True)
    staging.rename(kept)


def final_student(cfg: DistillConfig, inputs: DistillInputs, best: TrialParams, folder: Path, *,
                  kept: Path = FINAL_KEPT, world: World = SINGLE, **meta: object) -> FinalStudent:
    """The final student in `folder` (its distilops.json holding `meta`): a copy of the kept one when it was trained
    under the same key (same study, parameters, settings, data and code), else trained now and kept. Rank 0's
    call: the other ranks get `best` to train with, or None when the kept one is reused (stage main).

    The folder holds nothing run-specific (no run id, no time): the same student is the same bytes, so DVC sees
    an unchanged output and reruns nothing downstream."""
    key = final_key(cfg, inputs, best)
    shutil.rmtree(folder, ignore_errors=True)
    found = kept_final(key, kept)
    broadcast_object(best if found is None else None, world)
    if found is not None:
        shutil.copytree(kept / "model", folder)
        write_meta(folder, role="student", **meta)  # what the caller records, as training would (the same: no change)
        result = TrainResult(**{**found, "history": [tuple(h) for h in found["history"]]})
        log.info("final student: reusing the one trained with these parameters (%s, key %s): no training",
                 kept, key[:12])
        return FinalStudent(load_classifier(str(folder)), result, final_settings(cfg, inputs, best), reused=True)
    final = train_final(cfg, inputs, best, world)
    save_model_folder(final.model, inputs.tokenizer, folder, max_length=cfg.max_length, role="student", **meta)
    keep_final(folder, key, final.result, kept)
    return final


def train_final(cfg: DistillConfig, inputs: DistillInputs, best: TrialParams, world: World = SINGLE) -> FinalStudent:
    """The student trained on all training data with `best`'s parameters, checkpointed (an interrupted run
    resumes); validation accuracy (and the layer-wise parts) logged to the active run (by rank 0)."""
    seed_everything(cfg.seed)
    student = build_student(inputs.teacher, best.student_layers) if best.student_layers else inputs.make_student()
    layers = layer_targets(best, inputs.teacher, student)  # None while the layer-wise terms are off
    settings = final_settings(cfg, inputs, best)

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
        "final_reused": final.reused,  # copied from the kept student trained with the same key: no training now
        "train_examples": len(data["train"]),
        "transfer_examples": int((data["train"].labels == UNLABELLED).sum()),  # teacher-labelled only
        "student_layers": num_layers(final.model),
        "teacher_layers": num_layers(inputs.teacher),
        "student_parameters": count_parameters(final.model),
        "teacher_parameters": count_parameters(inputs.teacher),
    }
    metrics["val_accuracy_retention"] = round(stats.retention(metrics["val_accuracy"],
                                                              metrics["teacher_val_accuracy"]), 4)
    measured = study.user_attrs.get(LATENCY_ATTR)
    if measured:  # the frontier's latency axis: quartiles of each model's latency and of each depth's speedup
        metrics["teacher_latency_ms"] = served_latency.latency_ms(measured, served_latency.TEACHER)
        metrics["latency"] = measured
    metrics["choice"] = {**choice.report, "student_layers": metrics["student_layers"]}
    metrics["frontier"] = choice.rows
    return metrics


# metrics/distill.json's keys the stages downstream read (register tags the versions with them, summary shows two).
# The rule and its reason stay out: a rule change that picks the same point changes none of these, so DVC reruns
# nothing downstream (the rule is in metrics/distill.json and on the distill run).
CHOICE_KEYS = ("student_layers", "teacher_layers", "trials", "best_trial", "best_params", "frontier")


def downstream_report(metrics: dict) -> dict:
    """metrics/distill_choice.json: what the student is (its point, params, depth, the frontier it came from), not
    which rule picked it: the choice's reason is replaced by the point's own description."""
    choice = {k: v for k, v in metrics["choice"].items() if k not in ("rule", "reason", "point")}
    choice["reason"] = metrics["choice"].get("point", metrics["choice"]["reason"])
    return {**{k: metrics[k] for k in CHOICE_KEYS if k in metrics}, "choice": choice}

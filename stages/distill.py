"""DVC stage `distill`: an Optuna study over temperature, alpha and learning rate (and, when
`distill.search.student_layers` spans more than one depth, the student's depth), then the final student
trained on all training data with the chosen trial's parameters.

With depth searched, each trial is a point of a frontier: agreement with the teacher on validation and on
held-apart general text against the served variant's latency at its depth. `distill.choose` picks the
point; the stage logs why, plots the frontier (plots/distill/frontier.*) and writes the choice and the
frontier into metrics/distill.json, which the register stage records on the version.

Trials train on a fixed subset (they only need to rank settings); the final student then trains
on everything, checkpointed so an interrupted run resumes. Both the study (SQLite, or the
database in DISTILOPS_OPTUNA_STORAGE that `distilops tune` workers share) and the checkpoints
survive a crash; rerunning continues where it stopped.
"""

import logging
import warnings

import matplotlib
import mlflow
import optuna
import pandas as pd
from matplotlib import pyplot as plt
from optuna.visualization import matplotlib as optuna_plots

from distilops import paths
from distilops.config import DistillConfig, as_flat_dict, load_section
from distilops.pipeline import frontier
from distilops.pipeline.data import read_split
from distilops.pipeline.losses import UNLABELLED
from distilops.pipeline.modeling import build_student, count_parameters, num_layers, save_model_folder
from distilops.pipeline.served_latency import TEACHER
from distilops.pipeline.training import TrainSettings, clear_checkpoints, seed_everything, train
from distilops.pipeline.tuning import (
    LATENCY_ATTR,
    best_trial,
    complete_trials,
    distill_loss_fn,
    layer_targets,
    load_inputs,
    params_of,
    pruning_summary,
    searches_depth,
    tune,
)
from distilops.serving.folder import read_meta
from distilops.stage import run_stage, write_json
from distilops.tracking import data_hash, log_dataset, log_model_folder, stage_run

log = logging.getLogger("distill")
matplotlib.use("Agg")  # optuna and the frontier draw with pyplot: no display here
PLOTS = paths.plots_dir("distill")


def log_study_plots(study: optuna.Study) -> None:
    """Optimisation history and parameter importances, as files and MLflow artifacts (a depth search's:
    of fidelity, the mean of its two agreements)."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        target = ({"target": lambda t: (t.values[0] + t.values[1]) / 2, "target_name": "fidelity"}
                  if len(study.directions) > 1 else {})
        for name, plot in (("optimization_history", optuna_plots.plot_optimization_history),
                           ("param_importances", optuna_plots.plot_param_importances)):
            try:
                axes = plot(study, **target)
            except (ValueError, RuntimeError) as exc:  # importances need >= 2 complete trials
                log.info("no %s plot: %s", name, exc)
                axes = plt.figure(figsize=(6, 1.5)).gca()
                axes.axis("off")
                axes.text(0.5, 0.5, f"no {name.replace('_', ' ')}: {exc}", ha="center", wrap=True)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.tight_layout()
            figure.savefig(PLOTS / f"{name}.png", dpi=110)
            plt.close(figure)
            mlflow.log_artifact(str(PLOTS / f"{name}.png"), artifact_path="study")
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), "study/trials.csv")


def write_no_frontier(reason: str) -> None:
    """The frontier outputs DVC expects, saying there is none: an empty table and a figure with the reason."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns=["trial", "student_layers", "latency_ms", "fidelity"]).to_csv(PLOTS / "frontier.csv",
                                                                                     index=False)
    figure = plt.figure(figsize=(6, 1.5))
    figure.text(0.5, 0.5, f"no depth frontier: {reason}", ha="center", va="center", wrap=True, fontsize=8)
    figure.savefig(PLOTS / "frontier.png", dpi=110)
    plt.close(figure)


def choose_point(study: optuna.Study, cfg: DistillConfig) -> tuple[optuna.trial.FrozenTrial, dict, list[dict]]:
    """The trial the final student copies, why, and the frontier's rows ([] while depth is fixed)."""
    if not searches_depth(cfg):
        top = best_trial(study)
        layers = params_of(top, cfg).student_layers
        reason = (f"depth fixed ({layers or 'the configured'} layers: distill.search.student_layers is "
                  f"{cfg.search.student_layers}); trial {top.number} has the best validation accuracy, {top.value:.4f}")
        write_no_frontier(reason)
        return top, {"searched": False, "reason": reason, "trial": top.number}, []
    points = [frontier.Point(trial=t.number, student_layers=t.params["student_layers"],
                             params={k: v for k, v in t.params.items() if k != "student_layers"},
                             val_agreement=t.values[0], general_agreement=t.values[1], latency_ms=t.values[2],
                             speedup=t.user_attrs["speedup"], val_accuracy=t.user_attrs["val_accuracy"])
              for t in complete_trials(study)]
    chosen, reason = frontier.choose(points, cfg.choose)
    rows = frontier.frontier_rows(points, chosen)
    PLOTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(PLOTS / "frontier.csv", index=False)
    frontier.plot_frontier(points, chosen, PLOTS / "frontier.png", rule=cfg.choose)
    for name in ("frontier.csv", "frontier.png"):
        mlflow.log_artifact(str(PLOTS / name), artifact_path="frontier")
    choice = {"searched": True, "rule": cfg.choose.model_dump(), "reason": reason, "trial": chosen.trial,
              "student_layers": chosen.student_layers, "latency_ms": chosen.latency_ms, "speedup": chosen.speedup,
              "val_agreement": chosen.val_agreement, "general_agreement": chosen.general_agreement,
              "fidelity": chosen.fidelity}
    mlflow.log_metrics({f"chosen_{k}": v for k, v in choice.items() if isinstance(v, float)})
    mlflow.set_tag("distill.choice", reason[:5000])
    return study.trials[chosen.trial], choice, rows


def main() -> None:
    cfg = load_section(DistillConfig)
    inputs = load_inputs(cfg)
    data, pad_id = inputs.data, inputs.tokenizer.pad_token_id
    with stage_run("distill", as_flat_dict(cfg), **inputs.run_tags) as run:
        for split, context in (("train", "training"), ("validation", "validation")):
            log_dataset(read_split(split), split, paths.PREPARED / f"{split}.parquet", context)
        study = tune(cfg, inputs)
        top, choice, rows = choose_point(study, cfg)  # a clear error when every trial was pruned or diverged
        best = params_of(top, cfg)
        trial_val_accuracy = top.user_attrs.get("val_accuracy", top.value if len(top.values) == 1 else None)
        summary = pruning_summary(study)
        mlflow.log_params({f"best_{k}": v for k, v in vars(best).items()})
        mlflow.log_metrics({"best_trial_val_accuracy": trial_val_accuracy, **summary})
        log_study_plots(study)
        log.info("chose trial #%d: %s (val acc %.4f); %d pruned, %d diverged, ~%s s saved", top.number, vars(best),
                 trial_val_accuracy, summary["trials_pruned"], summary["trials_diverged"],
                 summary["pruning_seconds_saved"])
        log.info("why: %s", choice["reason"])

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

        result = train(student, data["train"], data["validation"], pad_id, settings, distill_loss_fn(best, layers),
                       on_eval=on_eval, extra=layers.projection if layers else None)
        save_model_folder(student, inputs.tokenizer, paths.STUDENT, max_length=cfg.max_length, role="student",
                          teacher=inputs.teacher_name, teacher_sha256=inputs.fingerprint["teacher"],
                          optuna_study=inputs.study_name, data_hash=data_hash(), mlflow_run_id=run.info.run_id,
                          **{f"best_{k}": v for k, v in vars(best).items()})
        metrics = {
            "study_name": inputs.study_name,
            "best_trial": top.number,
            "best_trial_val_accuracy": trial_val_accuracy,
            "best_params": vars(best),
            **summary,
            "val_accuracy": result.best_accuracy,
            "teacher_val_accuracy": float((data["validation"].teacher_logits.argmax(-1)
                                           == data["validation"].labels).mean()),
            "final_train_seconds": round(result.seconds, 1),
            "train_examples": len(data["train"]),
            "transfer_examples": int((data["train"].labels == UNLABELLED).sum()),  # teacher-labelled only
            "student_layers": num_layers(student),
            "teacher_layers": num_layers(inputs.teacher),
            "student_parameters": count_parameters(student),
            "teacher_parameters": count_parameters(inputs.teacher),
        }
        metrics["val_accuracy_retention"] = round(metrics["val_accuracy"] / metrics["teacher_val_accuracy"], 4)
        if LATENCY_ATTR in study.user_attrs:
            metrics["teacher_latency_ms"] = study.user_attrs[LATENCY_ATTR][TEACHER]
        metrics["choice"] = {**choice, "student_layers": metrics["student_layers"]}
        metrics["frontier"] = rows
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log_model_folder(paths.STUDENT, "student", read_meta(paths.STUDENT))
    write_json(paths.metrics_file("distill"), metrics)
    clear_checkpoints(settings)
    log.info("student val accuracy %.4f (%.1f%% of the teacher's)", result.best_accuracy,
             100 * metrics["val_accuracy_retention"])


if __name__ == "__main__":
    run_stage("distill", main)

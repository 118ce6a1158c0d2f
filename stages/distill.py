"""DVC stage `distill`: an Optuna study over temperature, alpha and learning rate (and, when
`distill.search.student_layers` spans more than one depth, the student's depth), then the final student
trained on all training data with the chosen trial's parameters.

With depth searched, each trial is a point of a frontier: agreement with the teacher on validation and on
held-apart general text against the served variant's latency at its depth. `distill.choose` picks the
point; the stage logs why, plots the frontier (plots/distill/frontier.*) and writes the choice and the
frontier into metrics/distill.json, which the register stage records on the version. The work is
pipeline/distill.py's (and tuning.py's): this script reads params, calls it, writes the outputs.

Trials train on a fixed subset (they only need to rank settings); the final student then trains
on everything, checkpointed so an interrupted run resumes, and is kept (checkpoints/student-final): a rerun whose
choice is the point it was trained from (a rule change that picks the same trial) copies it instead of training.
Stages downstream read metrics/distill_choice.json (the point, not the rule that picked it) and the student's
folder (no run id in it): such a rerun changes neither, so DVC reruns nothing after distill.
Both the study (SQLite, or the database in DISTILOPS_OPTUNA_STORAGE that `distilops tune` workers share) and the
checkpoints survive a crash; rerunning continues where it stopped.

With `distill.distributed` above one process (torchrun: pipeline/distributed.py), rank 0 alone runs the study and
chooses; every rank then trains the final student together (unless rank 0 reuses the kept one), and rank 0
writes the outputs.
"""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import logging

import matplotlib
import mlflow

from distilops import paths
from distilops.config import DistillConfig, as_flat_dict, load_section
from distilops.hashing import folder_sha256
from distilops.pipeline import distill
from distilops.pipeline.data import read_split
from distilops.pipeline.distributed import World, broadcast_object, session
from distilops.pipeline.training import clear_checkpoints
from distilops.pipeline.tuning import DistillInputs, load_inputs, params_of, pruning_summary, tune
from distilops.serving.folder import read_meta
from distilops.stage import run_stage, write_json
from distilops.tracking import data_hash, log_dataset, log_model_folder, stage_run

log = logging.getLogger("distill")
matplotlib.use("Agg")  # optuna's study plots draw with pyplot: no display here (ours use Figure, no pyplot)
PLOTS = paths.plots_dir("distill")


def main() -> None:
    cfg = load_section(DistillConfig)
    with session(cfg.distributed, "distill") as world:
        inputs = load_inputs(cfg)
        if world.main:
            tune_and_distill(cfg, inputs, world)
        elif (best := broadcast_object(None, world)) is not None:  # rank 0's choice (None: it reuses the kept one)
            distill.train_final(cfg, inputs, best, world)


def tune_and_distill(cfg: DistillConfig, inputs: DistillInputs, world: World) -> None:
    with stage_run("distill", as_flat_dict(cfg), **inputs.run_tags):
        for split, context in (("train", "training"), ("validation", "validation")):
            log_dataset(read_split(split), split, paths.PREPARED / f"{split}.parquet", context)
        study = tune(cfg, inputs)
        choice = distill.choose_point(study, cfg, PLOTS)  # a clear error when every trial was pruned or diverged
        best, summary = params_of(choice.trial, cfg), pruning_summary(study)
        trial_val_accuracy = distill.trial_val_accuracy(choice.trial)
        mlflow.log_params({f"best_{k}": v for k, v in vars(best).items()})
        mlflow.log_metrics({"best_trial_val_accuracy": trial_val_accuracy, **summary})
        distill.log_study_plots(study, PLOTS)
        log.info("chose trial #%d: %s (val acc %.4f); %d pruned, %d diverged, ~%s s saved", choice.trial.number,
                 vars(best), trial_val_accuracy, summary["trials_pruned"], summary["trials_diverged"],
                 summary["pruning_seconds_saved"])
        log.info("why: %s", choice.report["reason"])

        # The folder records the student's lineage, nothing run-specific (no run id): the same student is the same
        # bytes, so a rerun that picks the trained point again changes no output downstream stages read.
        final = distill.final_student(cfg, inputs, best, paths.STUDENT, world=world, teacher=inputs.teacher_name,
                                      teacher_sha256=inputs.fingerprint["teacher"], optuna_study=inputs.study_name,
                                      data_hash=data_hash(), **{f"best_{k}": v for k, v in vars(best).items()})
        metrics = distill.report(cfg, study, choice, inputs, final)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.set_tag("student_sha256", folder_sha256(paths.STUDENT))  # finds this run from the folder
        log_model_folder(paths.STUDENT, "student", read_meta(paths.STUDENT))
    write_json(paths.metrics_file("distill"), metrics)
    write_json(paths.metrics_file("distill_choice"), distill.downstream_report(metrics))
    clear_checkpoints(final.settings, world)
    log.info("student val accuracy %.4f (%.1f%% of the teacher's)", final.result.best_accuracy,
             100 * metrics["val_accuracy_retention"])


if __name__ == "__main__":
    run_stage("distill", main)

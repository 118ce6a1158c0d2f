"""DVC stage `teacher`: fine-tune the configured teacher for classification; keep the best epoch.

With `teacher.distributed` above one process, the script runs itself through torchrun (pipeline/distributed.py):
every rank trains, rank 0 alone writes the model, the metrics and the MLflow run."""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import logging
from contextlib import nullcontext

import mlflow

from distilops import paths
from distilops.config import TeacherConfig, as_flat_dict, load_section
from distilops.pipeline.batching import tokenize
from distilops.pipeline.data import read_labels, read_split
from distilops.pipeline.distributed import World, session
from distilops.pipeline.modeling import count_parameters, load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.training import TrainSettings, clear_checkpoints, seed_everything, train
from distilops.serving.folder import read_meta
from distilops.stage import run_stage, write_json
from distilops.tracking import data_hash, log_dataset, log_model_folder, stage_run

log = logging.getLogger("teacher")


def main() -> None:
    cfg = load_section(TeacherConfig)
    with session(cfg.distributed, "teacher") as world:
        train_teacher(cfg, world)


def train_teacher(cfg: TeacherConfig, world: World) -> None:
    seed_everything(cfg.seed)
    labels = read_labels()
    train_df, val_df = read_split("train"), read_split("validation")
    if cfg.max_train_examples:
        train_df = train_df.sample(n=min(cfg.max_train_examples, len(train_df)), random_state=cfg.seed)

    tokenizer = load_tokenizer(cfg.model)
    model = load_classifier(cfg.model, labels)
    train_data = tokenize(tokenizer, train_df["text"], train_df["label"], cfg.max_length)
    val_data = tokenize(tokenizer, val_df["text"], val_df["label"], cfg.max_length)
    settings = TrainSettings.from_config(
        cfg, epochs=cfg.epochs, learning_rate=cfg.learning_rate, checkpoint_dir=paths.CHECKPOINTS / "teacher",
        fingerprint={"stage": "teacher", **as_flat_dict(cfg), "data": data_hash()}, progress="teacher")
    with stage_run("teacher", as_flat_dict(cfg), teacher=cfg.model) if world.main else nullcontext():
        if world.main:
            log_dataset(train_df, "train", paths.PREPARED / "train.parquet", "training")
            log_dataset(val_df, "validation", paths.PREPARED / "validation.parquet", "validation")
        result = train(model, train_data, val_data, tokenizer.pad_token_id, settings,
                       on_eval=lambda step, acc: mlflow.log_metric("val_accuracy", acc, step=step), world=world)
        if not world.main:
            return
        save_model_folder(model, tokenizer, paths.TEACHER, max_length=cfg.max_length, source_model=cfg.model,
                          role="teacher", data_hash=data_hash())
        metrics = {
            "val_accuracy": result.best_accuracy,
            "best_step": result.best_step,
            "train_examples": len(train_data),
            "train_seconds": round(result.seconds, 1),
            "train_examples_per_second": round((result.steps - result.resumed_from_step)
                                               * cfg.batch_size / max(result.seconds, 1e-9), 1),
            "layers": int(model.config.num_hidden_layers),
            "parameters": count_parameters(model),
        }
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log_model_folder(paths.TEACHER, "teacher", read_meta(paths.TEACHER))
    write_json(paths.metrics_file("teacher"), metrics)
    clear_checkpoints(settings, world)
    log.info("val accuracy %.4f (%s s)", result.best_accuracy, metrics["train_seconds"])


if __name__ == "__main__":
    run_stage("teacher", main)

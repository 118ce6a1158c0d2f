"""DVC stage `teacher`: fine-tune the configured teacher for classification; keep the best epoch."""

import json
import sys
from pathlib import Path

import mlflow

from distilops.config import ConfigError, TeacherConfig, as_flat_dict, load_section
from distilops.data import DataError, read_split
from distilops.modeling import ModelError, count_parameters, load_classifier, load_tokenizer, save_model_folder
from distilops.pyfunc import log_model_folder
from distilops.tracking import data_hash, stage_run
from distilops.training import TrainSettings, clear_checkpoints, seed_everything, tokenize, train

DATA, OUT, METRICS = Path("data/prepared"), Path("models/teacher"), Path("metrics/teacher.json")


def main() -> None:
    cfg = load_section(TeacherConfig, "teacher")
    seed_everything(cfg.seed)
    labels = json.loads((DATA / "report.json").read_text())["labels"]
    train_df, val_df = read_split(DATA, "train"), read_split(DATA, "validation")
    if cfg.max_train_examples:
        train_df = train_df.sample(n=min(cfg.max_train_examples, len(train_df)), random_state=cfg.seed)

    tokenizer = load_tokenizer(cfg.model)
    model = load_classifier(cfg.model, labels)
    train_data = tokenize(tokenizer, train_df["text"], train_df["label"], cfg.max_length)
    val_data = tokenize(tokenizer, val_df["text"], val_df["label"], cfg.max_length)
    settings = TrainSettings(
        epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, seed=cfg.seed,
        checkpoint_every_steps=cfg.checkpoint_every_steps, checkpoint_dir=Path("checkpoints/teacher"),
        fingerprint={"stage": "teacher", **as_flat_dict(cfg), "data": data_hash()}, progress="teacher",
    )
    with stage_run("teacher", as_flat_dict(cfg), teacher=cfg.model):
        result = train(model, train_data, val_data, tokenizer.pad_token_id, settings,
                       on_eval=lambda step, acc: mlflow.log_metric("val_accuracy", acc, step=step))
        save_model_folder(model, tokenizer, OUT, max_length=cfg.max_length, source_model=cfg.model,
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
        log_model_folder(OUT, name="teacher")
    METRICS.parent.mkdir(exist_ok=True)
    METRICS.write_text(json.dumps(metrics, indent=2) + "\n")
    clear_checkpoints(settings)
    print(f"[teacher] val accuracy {result.best_accuracy:.4f} ({metrics['train_seconds']} s)")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ModelError) as exc:
        sys.exit(f"teacher: error: {exc}")

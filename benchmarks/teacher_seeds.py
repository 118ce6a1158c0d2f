"""The ceiling a student's fidelity is measured against: how often two teachers, fine-tuned by the pipeline's
own recipe from different seeds, agree with each other, in domain (the test split) and on general text (the
2,000 held-apart general_english sentences evaluate scores students on).

Trains one more teacher per seed with the `teacher` section of params.yaml (only the seed changed) into
benchmarks/.work/, then scores it against the pipeline's teacher (models/teacher, `dvc repro teacher`).
About 9 minutes per seed on 2 cores.

    PYTHONPATH=src python benchmarks/teacher_seeds.py --seeds 7 --out benchmarks/results/teacher_seeds_cpu.json

The defaults are the pipeline's paths; the tests point every one of them at a tiny stand-in (--params with a
tiny teacher section, --data, --teacher, --general-texts, --work).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from distilops import paths
from distilops.config import TeacherConfig, load_section
from distilops.pipeline.batching import predict_logits, tokenize
from distilops.pipeline.data import read_labels, read_split
from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.training import TrainSettings, seed_everything, train
from distilops.pipeline.transfer import unlabeled_texts
from distilops.stats import accuracy_interval, bootstrap_indices

WORK = Path("benchmarks/.work")


def train_teacher(cfg: TeacherConfig, seed: int, data: Path, work: Path) -> Path:
    """The teacher stage's recipe with another seed (cached: a finished one is reused)."""
    out = work / f"teacher-seed{seed}"
    if (out / "model.safetensors").exists():
        return out
    cfg = cfg.model_copy(update={"seed": seed})
    seed_everything(seed)
    tokenizer, model = load_tokenizer(cfg.model), load_classifier(cfg.model, read_labels(data / "report.json"))
    train_df, val_df = read_split("train", data), read_split("validation", data)
    settings = TrainSettings.from_config(cfg, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                                         checkpoint_dir=work / f"checkpoints-seed{seed}", progress=f"teacher {seed}",
                                         fingerprint={"benchmark": "teacher_seeds", "seed": seed})
    train(model, tokenize(tokenizer, train_df["text"], train_df["label"], cfg.max_length),
          tokenize(tokenizer, val_df["text"], val_df["label"], cfg.max_length), tokenizer.pad_token_id, settings)
    return save_model_folder(model, tokenizer, out, max_length=cfg.max_length, role="teacher", seed=seed)


def labels_of(folder: Path, texts: list[str], max_length: int) -> np.ndarray:
    tokenizer, model = load_tokenizer(str(folder)), load_classifier(str(folder)).eval()
    data = tokenize(tokenizer, texts, [0] * len(texts), max_length)
    return predict_logits(model, data, tokenizer.pad_token_id)[0].argmax(-1)


def with_interval(hits: np.ndarray) -> dict:
    low, high = accuracy_interval(hits, bootstrap_indices(len(hits), 1000, seed=0))
    return {"value": round(float(hits.mean()), 4), "ci": [round(low, 4), round(high, 4)], "texts": len(hits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7], help="seeds of the extra teachers")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_seeds_cpu.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="its teacher section is the recipe")
    parser.add_argument("--data", type=Path, default=paths.PREPARED, help="the prepared splits and report.json")
    parser.add_argument("--teacher", type=Path, default=paths.TEACHER, help="the pipeline's teacher: the reference")
    parser.add_argument("--general-texts", default="general_english",
                        help="general text: 'general_english' (evaluate's held-apart slice) or a text file")
    parser.add_argument("--work", type=Path, default=WORK, help="where the extra teachers are trained (and reused)")
    args = parser.parse_args()
    cfg = load_section(TeacherConfig, args.params)
    test = read_split("test", args.data)
    sets = {"test": test["text"].tolist(), "general_text": unlabeled_texts(args.general_texts, 0, seed=0)}
    reference = {name: labels_of(args.teacher, texts, cfg.max_length) for name, texts in sets.items()}
    result = {"what": "agreement of teachers fine-tuned from other seeds with the pipeline's teacher "
                      f"(seed {cfg.seed}), 95% bootstrap intervals",
              "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "teacher": {"model": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
                          "test_accuracy": round(float((reference["test"] == test["label"].to_numpy()).mean()), 4)},
              "seeds": {}}
    for seed in args.seeds:
        folder = train_teacher(cfg, seed, args.data, args.work)
        labels = {name: labels_of(folder, texts, cfg.max_length) for name, texts in sets.items()}
        entry = {f"{name}_agreement": with_interval(labels[name] == reference[name]) for name in sets}
        entry["test_accuracy"] = round(float((labels["test"] == test["label"].to_numpy()).mean()), 4)
        result["seeds"][str(seed)] = entry
        print(seed, json.dumps(entry))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Models for canary tests: a tiny teacher (ONNX), a student that agrees with it on a given share of texts and one
that disagrees on every text (labels reversed), each with the evaluation reference its version would carry,
packaged as Bento models the way `distilops package` packages them (test_canary_release.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from distilops.serving import fidelity
from distilops.serving.folder import MODEL_SUBDIR, SHADOW_SUBDIR, write_meta
from distilops.serving.inference import TextClassifier


def with_labels_reversed(folder: Path, into: Path) -> Path:
    """The same weights with the label names reversed: a model that disagrees with its teacher on every text."""
    copy = Path(shutil.copytree(folder, into))
    config = json.loads((copy / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    config["id2label"] = {str(i): name for i, name in enumerate(reversed(names))}
    config["label2id"] = {name: i for i, name in enumerate(reversed(names))}
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def agreement(folder: Path, teacher: Path, texts: list[str]) -> float:
    """The share of `texts` the served model labels as its teacher does (as the shadow compares them)."""
    model, shadow = TextClassifier(folder, device="cpu"), TextClassifier(teacher, device="cpu")
    return float(np.mean([a.label == b.label for a, b in zip(model.classify(texts), shadow.classify(texts),
                                                              strict=True)]))


def tiny_teacher(raw: Path, texts: list[str], into: Path) -> tuple[Path, Path]:
    """A tiny teacher that splits `texts` between its labels: a random tiny encoder gives every text nearly the
    same logits (its pooled output saturates: a spread of 1e-4), so the classifier's weights are scaled until
    the texts' margins spread by about 1 and its bias is centred on their median. (PyTorch folder, ONNX folder)"""
    import torch

    from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
    from distilops.pipeline.quantize import build

    classifier, tokenizer = load_classifier(str(raw)).eval(), load_tokenizer(str(raw))
    with torch.no_grad():
        encoded = tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
        head = classifier.classifier
        margins = classifier(**encoded).logits @ torch.tensor([-1.0, 1.0]) - (head.bias[1] - head.bias[0])
        head.weight *= 1 / float(margins.std())
        head.bias.copy_(torch.tensor([0.0, -float(margins.median() / margins.std())]))
    pytorch = save_model_folder(classifier, tokenizer, into / "pt", max_length=16, teacher="tiny")
    return pytorch, build("onnx_fp32", pytorch, into / "onnx")


def with_agreement(pytorch: Path, teacher: Path, texts: list[str], target: float, into: Path) -> Path:
    """The teacher's weights (`pytorch`, its PyTorch folder) with the classifier's bias moved against the label
    the teacher gives most, until the ONNX model agrees with the teacher on about `target` of `texts`: the
    texts nearest the boundary change label, as a student that learned its teacher imperfectly."""
    import torch

    from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
    from distilops.pipeline.quantize import build

    labels = [a.label for a in TextClassifier(teacher, device="cpu").classify(texts)]
    majority = max(set(labels), key=labels.count)
    classifier = load_classifier(str(pytorch))
    index = classifier.config.label2id[majority]
    bias = classifier.classifier.bias.detach().clone()
    low, high, best = 0.0, 4.0, None
    for step in range(12):  # bisection on the shift: agreement falls as it grows
        shift = (low + high) / 2
        with torch.no_grad():
            classifier.classifier.bias.copy_(bias)
            classifier.classifier.bias[index] -= shift
        folder = into / f"shift-{step}"
        onnx = build("onnx_fp32", save_model_folder(classifier, load_tokenizer(str(pytorch)), folder / "pt",
                                                    max_length=16, teacher="tiny"), folder / "onnx")
        agreed = agreement(onnx, teacher, texts)
        if best is None or abs(agreed - target) < abs(best[1] - target):
            best = (onnx, agreed)
        if abs(agreed - target) < 0.03:
            break
        low, high = (shift, high) if agreed > target else (low, shift)
    assert best is not None and abs(best[1] - target) < 0.06, f"no shift gives agreement {target}: {best}"
    return Path(shutil.copytree(best[0], into / "model"))


def with_reference(folder: Path, teacher: Path, texts: list[str],
                   evaluated: tuple[float, float] | None = None) -> None:
    """Record what evaluation would: the folder's predictions on `texts` and its agreement with the teacher
    (`evaluated`: the 95% interval the evaluation reported instead, when it was measured on other texts)."""
    model, shadow = TextClassifier(folder, device="cpu"), TextClassifier(teacher, device="cpu")
    answers, teacher_answers = model.classify(texts), shadow.classify(texts)
    agreed = float(np.mean([a.label == b.label for a, b in zip(answers, teacher_answers, strict=True)]))
    interval = evaluated or (agreed, agreed)
    write_meta(folder, reference=fidelity.reference(
        predicted=[a.label for a in answers], confidence=[a.score for a in answers],
        words=[fidelity.word_count(t) for t in texts], windows=[a.windows for a in answers], labels=model.labels,
        agreement=float(np.mean(interval)), agreement_ci=interval, split="fixture"))


BENTO_MODEL = """
import shutil, sys
from pathlib import Path
import bentoml
folder, teacher, tag, version, model_subdir, shadow_subdir = sys.argv[1:]
with bentoml.models.create(tag, labels={"registry_name": "tiny-sentiment", "registry_version": version},
                           metadata={}) as stored:
    shutil.copytree(folder, Path(stored.path) / model_subdir)
    shutil.copytree(teacher, Path(stored.path) / shadow_subdir)
"""


def bento_model(folder: Path, teacher: Path, tag: str, version: str, home: Path) -> str:
    """A Bento model as `distilops package` makes one (the served folder in model/, the teacher in shadow/), in
    the store at `home`. In a process of its own: BentoML reads BENTOML_HOME once per process, and the other
    tests' stores must not be this one."""
    subprocess.run([sys.executable, "-c", BENTO_MODEL, str(folder), str(teacher), tag, version, MODEL_SUBDIR,
                    SHADOW_SUBDIR], check=True,
                   env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}, timeout=120)
    return tag


def own_home(store: Path, into: Path) -> Path:
    """A BentoML home of its own holding a copy of `store`'s models."""
    shutil.copytree(store / "models", into / "models")
    return into

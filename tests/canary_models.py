"""Models for canary tests: a tiny teacher (ONNX), a student that agrees with it and one that disagrees on every
text (labels reversed), each with the evaluation reference its version would carry, packaged as Bento models
the way `distilops package` packages them (test_canary_release.py)."""

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


def with_reference(folder: Path, teacher: Path, texts: list[str]) -> None:
    """Record what evaluation would: the folder's predictions on `texts` and its agreement with the teacher."""
    model, shadow = TextClassifier(folder, device="cpu"), TextClassifier(teacher, device="cpu")
    answers, teacher_answers = model.classify(texts), shadow.classify(texts)
    agreed = np.mean([a.label == b.label for a, b in zip(answers, teacher_answers, strict=True)])
    write_meta(folder, reference=fidelity.reference(
        predicted=[a.label for a in answers], confidence=[a.score for a in answers],
        words=[fidelity.word_count(t) for t in texts], windows=[a.windows for a in answers], labels=model.labels,
        agreement=float(agreed), agreement_ci=(float(agreed), float(agreed)), split="fixture"))


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

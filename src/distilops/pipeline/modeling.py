"""Loading teachers and building students, the DistilBERT way.

A student built from a teacher has the teacher's architecture with fewer layers; its embeddings,
pooler and classifier are copied, and student layer i is teacher layer i * (L_teacher // L_student)
(every other layer for half the depth: 0, 2, 4, ...). Works for any encoder whose layers live
under `*.encoder.layer.N.` (BERT, MPNet, RoBERTa, ELECTRA, ...).

The layer-wise losses map student layer i to the last teacher layer of the block it replaces,
teacher layer (i + 1) * step - 1 (1, 3, 5 for half the depth): initialised from the block's first
layer, it learns to give the block's output, and the student's last layer the teacher's last
(TinyBERT's uniform mapping, g(m) = m * step for 1-based m).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from distilops.errors import ModelError
from distilops.pipeline.assets import resolve_model
from distilops.serving.folder import write_meta

LAYER_KEY = re.compile(r"(\.encoder\.layer\.)(\d+)(\.)")


def load_tokenizer(name_or_path: str):
    try:
        return AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    except OSError as exc:
        raise ModelError(f"could not load a tokenizer for '{name_or_path}': {exc}") from exc


def load_classifier(name_or_path: str, labels: list[str] | None = None) -> PreTrainedModel:
    """A sequence classifier from a catalogue name, hub id or folder; a new head when `labels` differ."""
    path = resolve_model(name_or_path)
    kwargs = {}
    if labels is not None:
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    try:
        # fp32 master weights whatever the checkpoint's dtype: transformers 5 would otherwise keep an
        # fp16 checkpoint in fp16, and AdamW on half-precision weights diverges (bf16 autocast on CUDA
        # still computes in half precision).
        return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load '{name_or_path}' as a sequence classifier: {exc}") from exc


def num_layers(model: PreTrainedModel) -> int:
    return int(model.config.num_hidden_layers)


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer copied into each student layer: every (L_t // L_s)-th, starting at 0."""
    if not 1 <= student_layers <= teacher_layers:
        raise ModelError(f"a student needs 1..{teacher_layers} layers, got {student_layers}")
    step = teacher_layers // student_layers
    return [i * step for i in range(student_layers)]


def target_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer whose outputs each student layer learns (the layer-wise losses): the last of the
    layers it replaces, i.e. the one before the next block's first in `layer_map` (1, 3, 5 for 6 -> 3)."""
    firsts = layer_map(teacher_layers, student_layers)  # a clear error for impossible sizes
    step = teacher_layers // student_layers
    return [first + step - 1 for first in firsts]


def build_student(teacher: PreTrainedModel, student_layers: int = 0) -> PreTrainedModel:
    """Same architecture as `teacher` with `student_layers` (0 = half) layers, initialised from it."""
    student_layers = student_layers or max(1, num_layers(teacher) // 2)
    mapping = layer_map(num_layers(teacher), student_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = student_layers
    student = type(teacher)(config)
    teacher_state = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        source = LAYER_KEY.sub(lambda m: f"{m[1]}{mapping[int(m[2])]}{m[3]}", key)
        if source not in teacher_state:
            raise ModelError(f"cannot map student weight '{key}' to the teacher ({source} missing)")
        state[key] = teacher_state[source].clone()
    student.load_state_dict(state)
    return student


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, student_name: str) -> None:
    """Soft targets are per example, but hidden states and cached inputs are per token: vocabularies must match."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differing = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise ModelError(
            f"student '{student_name}' has a different tokenizer from the teacher "
            f"({len(s_vocab)} vs {len(t_vocab)} tokens, {differing} entries differ); "
            "pick a student trained with the teacher's vocabulary (e.g. distilbert-base-uncased "
            "for bert-base-uncased) or leave distill.student_model empty to build one from the teacher"
        )
    probe = "Distillation keeps 97% of the accuracy!"
    if teacher_tokenizer(probe)["input_ids"] != student_tokenizer(probe)["input_ids"]:
        raise ModelError(f"student '{student_name}' tokenizes differently from the teacher (same vocab, other rules)")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model_folder(model: PreTrainedModel, tokenizer, folder: str | Path, *, max_length: int, **meta) -> Path:
    """save_pretrained + tokenizer + distilops.json (format, max_length, ...): a model folder (serving/folder.py)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_meta(folder, format="pytorch", max_length=max_length, parameters=count_parameters(model), **meta)
    return folder

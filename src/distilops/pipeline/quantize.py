"""Smaller, faster copies of the fp32 student: torch dynamic int8, ONNX fp32, ONNX Runtime int8 in two
schemes (what CPU nodes serve) and ONNX fp16 (what GPU nodes serve: ONNX Runtime's CUDA provider has no
kernels for the dynamic int8 operators, so an int8 model on a GPU would compute mostly on the CPU). And the
teacher as ONNX fp32 (`export_teacher`), the shadow model a pod may score a sample of its texts with.

The two ONNX int8 schemes differ in where activation scales come from:
- `onnx_int8` (dynamic): computed at run time over the whole input tensor, i.e. over every window of the
  batch, padding included, so a text's logits (and at a near-tie its label) depend on its neighbours.
- `onnx_int8_static` (static QDQ): fixed once, calibrated on training texts read as served; weights per output
  channel. Every row is then scaled alike whatever shares its batch: a text gets the same answer at any
  batch size and composition (tests/test_batch_invariance.py).

Each variant is a model folder (serving/folder.py) holding the student's tokenizer, config and
metadata beside its own weights, so every consumer loads it the same way. A variant is only
accepted when its test accuracy stays within a tolerance of the fp32 student's (`check`).

Why this order: a model already quantized by torch cannot be exported to ONNX, so ONNX int8 is
made from the fp32 ONNX export by ONNX Runtime. The legacy TorchScript exporter (`dynamo=False`)
is used because its graph quantizes cleanly with `quantize_dynamic` (the dynamo exporter's
graph fails ONNX Runtime's shape inference unless its value_info is cleared; docs/stack.md).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distilops.config import QUANTIZE_VARIANTS as VARIANTS
from distilops.errors import QuantizeError
from distilops.serving.folder import FORMAT_FILES, read_meta, write_meta

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".data")
TEACHER_CHECK = "teacher_onnx"  # the teacher export's entry in the stage's report, beside the variants'
TEACHER_VARIANT = "teacher_onnx_fp32"  # its variant: in its distilops.json and on its registry version
# The export runs the same fp32 arithmetic as PyTorch: only rounding may flip a prediction, on a near-tie.
TEACHER_MIN_AGREEMENT = 0.999


class _FromOnnxRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


@contextlib.contextmanager
def quiet_onnxruntime_root_logs() -> Iterator[None]:
    """ONNX Runtime's quantizer logs a pre-processing hint with `logging.warning` (the root logger):
    drop the root logger's records that come from ONNX Runtime, for this call only."""
    only_ours = _FromOnnxRuntime()
    root = logging.getLogger()
    root.addFilter(only_ours)
    try:
        yield
    finally:
        root.removeFilter(only_ours)


def copy_model_files(src: Path, dst: Path) -> None:
    """Tokenizer, config and distilops.json of `src` into a fresh `dst`; weights are not copied."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)


def quantize_torch_int8(student: Path, out: Path) -> Path:
    """Dynamic int8 Linear layers (weights int8, activations quantized per batch at run time)."""
    model = AutoModelForSequenceClassification.from_pretrained(student, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    copy_model_files(student, out)
    torch.save(quantized.state_dict(), out / FORMAT_FILES["pytorch-int8"])
    write_meta(out, format="pytorch-int8", variant="torch_int8", quantized_from=str(student))
    return out


def export_onnx(student: Path, out: Path, opset: int = 17) -> Path:
    """fp32 ONNX graph with dynamic batch and sequence axes; outputs `logits`."""
    model = AutoModelForSequenceClassification.from_pretrained(
        student, dtype=torch.float32, attn_implementation="eager"  # sdpa does not export with dynamo=False
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(student)
    # Positional export inputs must follow forward()'s order (BERT: input_ids, attention_mask, token_type_ids),
    # not the tokenizer's (input_ids, token_type_ids, attention_mask).
    accepted = set(tokenizer.model_input_names) & {"input_ids", "attention_mask", "token_type_ids"}
    names = [n for n in inspect.signature(model.forward).parameters if n in accepted]
    example = tokenizer(["a short example", "and a slightly longer second example"], padding=True,
                        return_tensors="pt")
    copy_model_files(student, out)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
        torch.onnx.export(
            model, tuple(example[n] for n in names), out / FORMAT_FILES["onnx"], input_names=names,
            output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=opset,
            dynamo=False,
        )
    write_meta(out, format="onnx", variant="onnx_fp32", onnx_opset=opset, quantized_from=str(student))
    return out


def quantize_onnx_int8(onnx_fp32: Path, out: Path) -> Path:
    """ONNX Runtime dynamic quantization: int8 MatMul weights and int8 embedding tables (Gather)."""
    copy_model_files(onnx_fp32, out)
    with quiet_onnxruntime_root_logs():
        quantize_dynamic(str(onnx_fp32 / FORMAT_FILES["onnx"]), str(out / FORMAT_FILES["onnx"]),
                         weight_type=QuantType.QInt8)
    write_meta(out, format="onnx", variant="onnx_int8", quantized_from=str(onnx_fp32))
    return out


CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                       "entropy": CalibrationMethod.Entropy}
CALIBRATION_BATCH = 32  # texts per calibration batch: the ranges are gathered over all of them either way


Encode = Callable[[list[str]], dict[str, np.ndarray]]  # texts -> the model's input arrays, one row per window


class CalibrationTexts(CalibrationDataReader):
    """The calibration texts, `CALIBRATION_BATCH` at a time, as `encode` turns them into the model's inputs.
    `row_by_row`: one window per call (the histogram methods stack every call's activations into one array,
    so every call must have one shape: `encode` then pads to the full window)."""

    def __init__(self, texts: list[str], encode: Encode, inputs: set[str], *, row_by_row: bool = False) -> None:
        self.texts, self.encode, self.inputs, self.row_by_row = texts, encode, inputs, row_by_row
        self.batches = iter(range(0, len(texts), CALIBRATION_BATCH))
        self.pending: list[dict[str, np.ndarray]] = []

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pending:
            return self.pending.pop(0)
        start = next(self.batches, None)
        if start is None:
            return None
        batch = self.encode(self.texts[start: start + CALIBRATION_BATCH])
        batch = {name: values for name, values in batch.items() if name in self.inputs}
        if not self.row_by_row:
            return batch
        rows = len(next(iter(batch.values())))
        self.pending = [{name: values[i: i + 1] for name, values in batch.items()} for i in range(rows)]
        return self.get_next()


def quantize_onnx_int8_static(onnx_fp32: Path, out: Path, texts: list[str], encode: Encode, *,
                              method: str = "minmax") -> Path:
    """ONNX Runtime static quantization in QDQ form: int8 MatMul weights per output channel and int8 embedding
    tables (as the dynamic variant), uint8 activations with scales calibrated on `texts`, fed as `encode` makes
    them (the served tokenizer and windows: so the ranges cover what serving feeds in), by `method`.

    Only MatMuls with a weight operand are quantized (`MatMulConstBOnly`), the ones the dynamic variant
    quantizes, so the two differ in the activation scales alone; the attention products stay fp32."""
    if not texts:
        raise QuantizeError("onnx_int8_static needs calibration texts (quantize.calibration_texts > 0)")
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method '{method}'; known: {list(CALIBRATION_METHODS)}")
    copy_model_files(onnx_fp32, out)
    source = onnx_fp32 / FORMAT_FILES["onnx"]
    inputs = {i.name for i in onnx.load(str(source), load_external_data=False).graph.input}
    with quiet_onnxruntime_root_logs():
        reader = CalibrationTexts(texts, encode, inputs, row_by_row=method != "minmax")
        quantize_static(str(source), str(out / FORMAT_FILES["onnx"]), reader,
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                        calibrate_method=CALIBRATION_METHODS[method],
                        extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True,
                                       "ActivationSymmetric": False})
    write_meta(out, format="onnx", variant="onnx_int8_static", quantized_from=str(onnx_fp32),
               calibration={"texts": len(texts), "method": method})
    return out


def convert_onnx_fp16(onnx_fp32: Path, out: Path) -> Path:
    """fp16 weights and activations for the GPU; int64 token ids in and fp32 logits out, as the others."""
    copy_model_files(onnx_fp32, out)
    model = convert_float_to_float16(onnx.load(str(onnx_fp32 / FORMAT_FILES["onnx"])), keep_io_types=True)
    onnx.save(model, str(out / FORMAT_FILES["onnx"]))
    write_meta(out, format="onnx", variant="onnx_fp16", quantized_from=str(onnx_fp32))
    return out


def export_teacher(teacher: Path, out: Path, opset: int = 17) -> Path:
    """The teacher as an fp32 ONNX folder, by the exporter the student variants use, so the serving runtime
    (ONNX Runtime, no torch) can run it beside the student."""
    export_onnx(teacher, out, opset)
    write_meta(out, variant=TEACHER_VARIANT)  # role "teacher" and its lineage come with the teacher's own
    return out


@dataclass
class Calibration:
    """What onnx_int8_static calibrates its activation scales on (QuantizeConfig's keys), and how texts become
    model inputs: the served tokenizer and windows, e.g. `open_classifier(student).encode` (handed in, so this
    module, which the distill stage imports, needs no serving runtime: a serving edit reruns no training)."""

    texts: list[str]
    encode: Encode
    method: str = "minmax"

    @classmethod
    def served_as(cls, model: Any, texts: list[str], method: str = "minmax") -> Calibration:
        """Calibration on `texts` read as `model` (a TextClassifier) reads them: its tokenizer and windows.
        The histogram methods stack every batch's activations into one array, so there every batch is padded
        to the full window (`max_length`); minmax takes each batch as served, padded to its longest text."""
        pad_id = model.encode.tokenizer.padding["pad_id"]

        def encode(batch: list[str]) -> dict[str, np.ndarray]:
            arrays = model.encode(batch).batch
            if method == "minmax":
                return arrays
            extra = model.max_length - next(iter(arrays.values())).shape[1]
            return {name: np.pad(values, ((0, 0), (0, extra)), constant_values=pad_id if name == "input_ids" else 0)
                    for name, values in arrays.items()}

        return cls(texts, encode, method)


def build(variant: str, student: Path, out_root: Path, *, opset: int = 17,
          calibration: Calibration | None = None) -> Path:
    """Build one variant under `out_root/variant` (the ONNX int8 and fp16 variants build onnx_fp32 first if
    missing; onnx_int8_static needs `calibration`)."""
    out = out_root / variant
    if variant == "torch_int8":
        return quantize_torch_int8(student, out)
    if variant == "onnx_fp32":
        return export_onnx(student, out, opset)
    if variant in ("onnx_int8", "onnx_int8_static", "onnx_fp16"):
        fp32 = out_root / "onnx_fp32"
        if not (fp32 / FORMAT_FILES["onnx"]).exists():
            export_onnx(student, fp32, opset)
        if variant == "onnx_int8_static":
            if calibration is None:
                raise QuantizeError("onnx_int8_static needs calibration texts (quantize.calibration_texts > 0)")
            return quantize_onnx_int8_static(fp32, out, calibration.texts, calibration.encode,
                                             method=calibration.method)
        return quantize_onnx_int8(fp32, out) if variant == "onnx_int8" else convert_onnx_fp16(fp32, out)
    raise QuantizeError(f"unknown variant '{variant}'; known: {list(VARIANTS)}")


@dataclass
class Check:
    """A variant's test predictions against the fp32 student's."""

    variant: str
    accuracy: float
    student_accuracy: float
    accuracy_drop: float  # student accuracy minus variant accuracy (positive = worse)
    agreement_with_student: float
    size_mb: float
    student_size_mb: float
    accepted: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def weights_size_mb(folder: Path) -> float:
    """Size of the weight file(s) on disk, in MB (10^6 bytes)."""
    meta_format = read_meta(folder).get("format", "pytorch")
    path = folder / FORMAT_FILES[meta_format]
    extra = sum(p.stat().st_size for p in folder.glob("*.data"))  # ONNX external data, if any
    return round((path.stat().st_size + extra) / 1e6, 3)


def check(variant: str, predictions: np.ndarray, student_predictions: np.ndarray, labels: np.ndarray, *,
          max_accuracy_drop: float, size_mb: float, student_size_mb: float) -> Check:
    """Accept a variant when its accuracy is at most `max_accuracy_drop` below the student's."""
    accuracy = float((predictions == labels).mean())
    student_accuracy = float((student_predictions == labels).mean())
    drop = student_accuracy - accuracy
    accepted = drop <= max_accuracy_drop + 1e-12
    reason = (f"accuracy {accuracy:.4f} vs student {student_accuracy:.4f} (drop {drop:+.4f}, "
              f"tolerance {max_accuracy_drop})")
    return Check(variant=variant, accuracy=accuracy, student_accuracy=student_accuracy, accuracy_drop=drop,
                 agreement_with_student=float((predictions == student_predictions).mean()), size_mb=size_mb,
                 student_size_mb=student_size_mb, accepted=accepted, reason=reason)


@dataclass
class TeacherCheck:
    """The teacher's ONNX export's test predictions against the PyTorch teacher's: registered only if they agree."""

    variant: str
    agreement_with_teacher: float
    min_agreement: float
    accuracy: float
    teacher_accuracy: float
    size_mb: float
    teacher_size_mb: float
    accepted: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def check_teacher(predictions: np.ndarray, teacher_predictions: np.ndarray, labels: np.ndarray, *, size_mb: float,
                  teacher_size_mb: float, min_agreement: float = TEACHER_MIN_AGREEMENT) -> TeacherCheck:
    """Accept the export when it predicts the PyTorch teacher's label on at least `min_agreement` of the texts."""
    agreement = float((predictions == teacher_predictions).mean())
    accepted = agreement >= min_agreement - 1e-12
    reason = (f"agreement with the PyTorch teacher {agreement:.4f} on {len(labels)} test texts (needs >= "
              f"{min_agreement})" + ("" if accepted else ": not registered, so releases carry no shadow model"))
    return TeacherCheck(variant=TEACHER_VARIANT, agreement_with_teacher=agreement, min_agreement=min_agreement,
                        accuracy=float((predictions == labels).mean()),
                        teacher_accuracy=float((teacher_predictions == labels).mean()),
                        size_mb=size_mb, teacher_size_mb=teacher_size_mb, accepted=accepted, reason=reason)

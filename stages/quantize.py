"""DVC stage `quantize`: torch dynamic int8, ONNX fp32, ONNX Runtime int8 dynamic and static (CPU serving; the
static one calibrated on `quantize.calibration_texts` training texts) and ONNX fp16 (GPU serving) copies of the
student, each checked against the fp32 student's test predictions, read in
the same windows as evaluated and served; a variant that loses more accuracy than
`quantize.max_accuracy_drop` is reported as rejected (and the register stage skips it).
The teacher is exported to ONNX fp32 too (models/teacher_onnx: the shadow model a release carries) and
checked against the PyTorch teacher: below 0.999 agreement it is rejected (report key "teacher_onnx")."""

import _preflight  # noqa: F401 (first: a Python without the project says so in one line)

# isort: split

import logging
from pathlib import Path

import numpy as np

from distilops import paths
from distilops.config import QuantizeConfig, load_section
from distilops.pipeline.data import read_split
from distilops.pipeline.quantize import (
    TEACHER_CHECK,
    Calibration,
    build,
    check,
    check_teacher,
    export_teacher,
    weights_size_mb,
)
from distilops.pipeline.torch_model import open_classifier
from distilops.stage import run_stage, write_json

log = logging.getLogger("quantize")


def main() -> None:
    cfg = load_section(QuantizeConfig)
    test = read_split("test")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    windows = {"window_overlap": cfg.window_overlap, "max_windows": cfg.max_windows}  # as evaluated and served

    def predictions(folder: Path) -> np.ndarray:
        return open_classifier(folder, **windows).predict_logits_batched(texts, cfg.batch_size).argmax(-1)

    train = read_split("train")
    # Calibration texts: a seeded sample of the training split, never a text the accuracy check scores.
    sample = train["text"].sample(n=min(cfg.calibration_texts, len(train)), random_state=cfg.seed).tolist()
    student = open_classifier(paths.STUDENT, **windows)
    calibration = Calibration.served_as(student, sample, cfg.calibration_method)  # the served windows
    student_preds = student.predict_logits_batched(texts, cfg.batch_size).argmax(-1)
    student_size = weights_size_mb(paths.STUDENT)
    results = {}
    for variant in cfg.variants:
        folder = build(variant, paths.STUDENT, paths.QUANTIZED, opset=cfg.onnx_opset, calibration=calibration)
        result = check(variant, predictions(folder), student_preds, labels, max_accuracy_drop=cfg.max_accuracy_drop,
                       size_mb=weights_size_mb(folder), student_size_mb=student_size)
        results[variant] = result.as_dict()
        log.info("%-10s %s: %s; agreement with student %.4f; %.1f MB vs %.1f MB", variant,
                 "accepted" if result.accepted else "REJECTED", result.reason, result.agreement_with_student,
                 result.size_mb, result.student_size_mb)
    teacher = export_teacher(paths.TEACHER, paths.TEACHER_ONNX, opset=cfg.onnx_opset)
    teacher_check = check_teacher(predictions(teacher), predictions(paths.TEACHER), labels,
                                  size_mb=weights_size_mb(teacher), teacher_size_mb=weights_size_mb(paths.TEACHER))
    results[TEACHER_CHECK] = teacher_check.as_dict()
    log.log(logging.INFO if teacher_check.accepted else logging.WARNING, "teacher ONNX %s: %s; %.1f MB",
            "accepted" if teacher_check.accepted else "REJECTED", teacher_check.reason, teacher_check.size_mb)
    write_json(paths.metrics_file("quantize"), results)


if __name__ == "__main__":
    run_stage("quantize", main)

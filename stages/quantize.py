"""DVC stage `quantize`: torch dynamic int8, ONNX fp32 and ONNX Runtime int8 copies of the student,
each checked against the fp32 student's test predictions; a variant that loses more accuracy than
`quantize.max_accuracy_drop` is reported as rejected (and the register stage skips it)."""

import json
import sys
from pathlib import Path

from distilops.config import ConfigError, QuantizeConfig, load_section
from distilops.data import DataError, read_split
from distilops.predict import TextClassifier
from distilops.quantize import QuantizeError, build, check, weights_size_mb

DATA, STUDENT = Path("data/prepared"), Path("models/student")
OUT, METRICS = Path("models/quantized"), Path("metrics/quantize.json")


def main() -> None:
    cfg = load_section(QuantizeConfig, "quantize")
    test = read_split(DATA, "test")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    student_preds = TextClassifier(STUDENT).predict_logits_batched(texts, cfg.batch_size).argmax(-1)
    student_size = weights_size_mb(STUDENT)
    results = {}
    for variant in cfg.variants:
        folder = build(variant, STUDENT, OUT, opset=cfg.onnx_opset)
        preds = TextClassifier(folder).predict_logits_batched(texts, cfg.batch_size).argmax(-1)
        result = check(variant, preds, student_preds, labels, max_accuracy_drop=cfg.max_accuracy_drop,
                       size_mb=weights_size_mb(folder), student_size_mb=student_size)
        results[variant] = result.as_dict()
        verdict = "accepted" if result.accepted else "REJECTED"
        print(f"[quantize] {variant:10s} {verdict}: {result.reason}; agreement with student "
              f"{result.agreement_with_student:.4f}; {result.size_mb:.1f} MB vs {result.student_size_mb:.1f} MB")
    METRICS.parent.mkdir(exist_ok=True)
    METRICS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, QuantizeError) as exc:
        sys.exit(f"quantize: error: {exc}")

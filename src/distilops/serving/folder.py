"""The model-folder format: the contract between the pipeline, which writes model folders, and
everything that reads them (evaluation, the registry, packaging, the service).

A model folder holds the tokenizer files, `config.json` (labels in `id2label`),
`distilops.json` ({"format": ..., "max_length": ..., window settings, lineage}) and one of:
  - `model.safetensors`  format "pytorch"       (Hugging Face save_pretrained)
  - `model_int8.pt`      format "pytorch-int8"  (state dict of torch dynamic-int8 Linear layers)
  - `model.onnx`         format "onnx"          (fp32, fp16 or ONNX Runtime int8; run with ONNX Runtime)

The serving images read ONNX folders only (serving/inference.py); the pipeline runs PyTorch ones
(pipeline/torch_model.py). Editing this file reruns the stages that write folders, by design.
"""

from __future__ import annotations

import json
from pathlib import Path

from distilops.errors import ModelError

META_FILE = "distilops.json"
MODEL_SUBDIR = "model"  # the model folder inside a Bento model's directory (distilops package)
SHADOW_SUBDIR = "shadow"  # the release's teacher (ONNX), beside it, when packaged with its shadow
FORMAT_FILES = {"pytorch": "model.safetensors", "pytorch-int8": "model_int8.pt", "onnx": "model.onnx"}
# How a folder that records no window settings is read: params.yaml's defaults (tests pin them equal).
WINDOW_OVERLAP = 16  # tokens neighbouring windows of a long text share (at most half a window)
MAX_WINDOWS = 16  # windows per text at most: bounds a text's cost at 16 short texts' worth


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.exists():
        return {"format": "pytorch"}
    return read_json(path)


def write_meta(folder: str | Path, **meta: object) -> None:
    path = Path(folder) / META_FILE
    current = read_meta(folder) if path.exists() else {}
    current.update(meta)
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def detect_format(folder: str | Path) -> str:
    meta_format = read_meta(folder).get("format")
    if meta_format in FORMAT_FILES and (Path(folder) / FORMAT_FILES[meta_format]).exists():
        return meta_format
    for fmt, filename in FORMAT_FILES.items():
        if (Path(folder) / filename).exists():
            return fmt
    raise ModelError(f"{folder}: no model file found (expected one of {sorted(FORMAT_FILES.values())})")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read it ({exc}): not a saved model folder?") from exc


def find_model_folder(root: str | Path) -> Path:
    """The model folder somewhere under `root` (e.g. a downloaded MLflow model): the one holding distilops.json."""
    root = Path(root)
    hits = sorted(p.parent for p in root.rglob(META_FILE))
    if not hits:
        raise ModelError(f"no {META_FILE} under {root}: not a distilops model")
    return hits[0]

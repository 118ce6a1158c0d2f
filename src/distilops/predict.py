"""Load a saved model folder and classify texts: the one inference path that evaluation,
the MLflow pyfunc model and the BentoML service share.

A model folder holds the tokenizer files, `config.json` (labels in `id2label`),
`distilops.json` ({"format": ..., "max_length": ...}) and one of:
  - `model.safetensors`  format "pytorch"       (Hugging Face save_pretrained)
  - `model_int8.pt`      format "pytorch-int8"  (state dict of torch dynamic-int8 Linear layers)
  - `model.onnx`         format "onnx"          (fp32 or ONNX Runtime int8; run with ONNX Runtime)
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from distilops.errors import ModelError

META_FILE = "distilops.json"
MODEL_SUBDIR = "model"  # the model folder inside a Bento model's directory (distilops package)
FORMAT_FILES = {"pytorch": "model.safetensors", "pytorch-int8": "model_int8.pt", "onnx": "model.onnx"}


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.exists():
        return {"format": "pytorch"}
    return json.loads(path.read_text())


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


def load_torch_int8(folder: str | Path) -> torch.nn.Module:
    """Rebuild the architecture from config.json, quantize it the same way, load the int8 weights."""
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_config(config)
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao; its tensors load through TypedStorage
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        model.load_state_dict(torch.load(Path(folder) / FORMAT_FILES["pytorch-int8"], weights_only=False))
    return model.eval()


@dataclass
class Prediction:
    label: str
    score: float
    truncated: bool


class TextClassifier:
    """Tokenizer + model from one folder; `predict_logits` and `classify` work on raw texts."""

    def __init__(self, folder: str | Path, device: str | None = None, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.format = detect_format(self.folder)
        meta = read_meta(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.max_length = int(meta.get("max_length") or min(self.tokenizer.model_max_length, 512))
        config = AutoConfig.from_pretrained(self.folder)
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.device = device or ("cuda" if torch.cuda.is_available() and self.format != "pytorch-int8" else "cpu")
        if threads:
            torch.set_num_threads(threads)
        if self.format == "onnx":
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = ort.InferenceSession(str(self.folder / "model.onnx"), options, providers=providers)
            self.onnx_inputs = {i.name for i in self.session.get_inputs()}
            self.model = None
        else:
            if self.format == "pytorch":
                self.model = AutoModelForSequenceClassification.from_pretrained(self.folder).eval()
            else:
                self.model = load_torch_int8(self.folder)
                self.device = "cpu"  # dynamic int8 kernels are CPU-only
            self.model.to(self.device)

    def encode(self, texts: list[str]) -> tuple[dict, list[bool]]:
        """Tokenize (truncated to max_length, padded to the longest text) and flag truncated texts."""
        batch = dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="np"))
        truncated = [False] * len(texts)
        # Only texts that reached max_length can have been cut: re-tokenize just those, untruncated.
        at_limit = [i for i, n in enumerate(batch["attention_mask"].sum(axis=1)) if n >= self.max_length]
        if at_limit:
            full = self.tokenizer([texts[i] for i in at_limit], truncation=False, verbose=False)["input_ids"]
            for i, ids in zip(at_limit, full, strict=True):
                truncated[i] = len(ids) > self.max_length
        return batch, truncated

    @torch.inference_mode()
    def predict_logits(self, texts: list[str]) -> np.ndarray:
        batch, _ = self.encode(texts)
        return self._forward(batch)

    def predict_logits_batched(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Logits for any number of texts, `batch_size` at a time, in input order."""
        parts = [self.predict_logits(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), dtype=np.float32)

    @torch.inference_mode()
    def _forward(self, batch: dict) -> np.ndarray:
        if self.format == "onnx":
            feeds = {k: v.astype(np.int64) for k, v in batch.items() if k in self.onnx_inputs}
            return self.session.run(None, feeds)[0]
        tensors = {k: torch.as_tensor(v).to(self.device) for k, v in batch.items()}
        return self.model(**tensors).logits.float().cpu().numpy()

    def classify(self, texts: list[str]) -> list[Prediction]:
        batch, truncated = self.encode(texts)
        logits = self._forward(batch)
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        ids = probs.argmax(axis=-1)
        return [Prediction(self.labels[i], float(p[i]), t) for i, p, t in zip(ids, probs, truncated, strict=True)]

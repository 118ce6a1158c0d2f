"""PyTorch model folders (the teacher, the fp32 student and its torch dynamic-int8 copy) run through
the serving package's `TextClassifier`, so every format is tokenized, windowed and scored the same
way. Only the pipeline runs these (evaluation, quantization checks, and MLflow when it loads the
registered fp32 student); the serving images hold ONNX folders and no torch.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from distilops.serving.folder import FORMAT_FILES, detect_format
from distilops.serving.inference import TextClassifier


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


class TorchModel:
    """A Hugging Face sequence classifier called with the encoder's numpy batch; returns float32 logits."""

    def __init__(self, folder: Path, fmt: str, *, device: str | None, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        if fmt == "pytorch-int8":
            self.model, self.device = load_torch_int8(folder), "cpu"  # dynamic int8 kernels are CPU-only
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.providers = [f"torch:{self.device}"]
        # MPNet takes no token_type_ids: pass only what forward() accepts.
        self.inputs = set(inspect.signature(self.model.forward).parameters)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        tensors = {k: torch.as_tensor(v).to(self.device) for k, v in batch.items() if k in self.inputs}
        return self.model(**tensors).logits.float().cpu().numpy()


def open_classifier(folder: str | Path, device: str | None = None, threads: int | None = None, *,
                    window_overlap: int | None = None, max_windows: int | None = None) -> TextClassifier:
    """A `TextClassifier` for a folder of any format: ONNX on ONNX Runtime, PyTorch on torch."""
    fmt = detect_format(folder)
    model = None if fmt == "onnx" else TorchModel(Path(folder), fmt, device=device, threads=threads)
    return TextClassifier(folder, device, threads, window_overlap=window_overlap, max_windows=max_windows,
                          model=model)

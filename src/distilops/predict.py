"""Load a saved model folder and classify texts: the one inference path that evaluation,
the MLflow pyfunc model and the BentoML service share.

A model folder holds the tokenizer files, `config.json` (labels in `id2label`),
`distilops.json` ({"format": ..., "max_length": ...}) and one of:
  - `model.safetensors`  format "pytorch"       (Hugging Face save_pretrained)
  - `model_int8.pt`      format "pytorch-int8"  (state dict of torch dynamic-int8 Linear layers)
  - `model.onnx`         format "onnx"          (fp32, fp16 or ONNX Runtime int8; run with ONNX Runtime)

ONNX folders need neither torch nor transformers: the text is tokenized by `tokenizers` (the Rust
library under transformers' fast tokenizers, reading the folder's tokenizer.json, so the ids are
the same) and the model runs on ONNX Runtime. That is all the serving images carry. PyTorch
folders are run by `predict_torch`, imported only for them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from distilops.errors import ModelError

META_FILE = "distilops.json"
MODEL_SUBDIR = "model"  # the model folder inside a Bento model's directory (distilops package)
FORMAT_FILES = {"pytorch": "model.safetensors", "pytorch-int8": "model_int8.pt", "onnx": "model.onnx"}
CUDA = "CUDAExecutionProvider"


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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read it ({exc}): not a saved model folder?") from exc


class TextEncoder:
    """The folder's tokenizer with transformers' settings (`padding=True, truncation=True, max_length`):
    right-padded to the longest text of the batch, cut at `max_length` tokens, special tokens added."""

    def __init__(self, folder: Path, max_length: int) -> None:
        settings = read_json(folder / "tokenizer_config.json")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        pad_token = settings.get("pad_token")
        pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
        pad_id = self.tokenizer.token_to_id(pad_token) if pad_token else None
        if pad_id is None:
            raise ModelError(f"{folder}: the tokenizer has no pad token ({pad_token!r})")
        self.tokenizer.enable_truncation(max_length, direction=settings.get("truncation_side", "right"))
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token,
                                      direction=settings.get("padding_side", "right"))

    def __call__(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], list[bool]]:
        """input_ids, attention_mask, token_type_ids (int64, [texts, longest]) and whether each text was cut."""
        encodings = self.tokenizer.encode_batch(list(texts))
        batch = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
        return batch, [bool(e.overflowing) for e in encodings]


class OnnxModel:
    """An ONNX Runtime session: CUDA first when asked for and present, the CPU otherwise."""

    def __init__(self, path: Path, *, cuda: bool, threads: int | None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        cuda = cuda and CUDA in ort.get_available_providers()  # onnxruntime-gpu is installed
        if cuda:
            # The CUDA and cuDNN libraries come as nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]), not on the
            # loader's path: without this the CUDA provider fails to load (libcublasLt.so.13 not found).
            with contextlib.suppress(Exception):
                ort.preload_dlls(directory="")
        providers = [CUDA, "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = {i.name for i in self.session.get_inputs()}

    @property
    def providers(self) -> list[str]:
        """What the session really runs on (ONNX Runtime drops a provider that fails to load)."""
        return self.session.get_providers()

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: v for k, v in batch.items() if k in self.inputs})[0]


@dataclass
class Prediction:
    label: str
    score: float
    truncated: bool


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TextClassifier:
    """Tokenizer + model from one folder; `predict_logits` and `classify` work on raw texts.

    `device`: "cuda" or "cpu"; None = CUDA when available. `threads`: CPU threads (None = all).
    """

    def __init__(self, folder: str | Path, device: str | None = None, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.format = detect_format(self.folder)
        meta = read_meta(self.folder)
        config = read_json(self.folder / "config.json")
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        self.max_length = int(meta.get("max_length") or 512)
        self.encode = TextEncoder(self.folder, self.max_length)
        if self.format == "onnx":
            self.model = OnnxModel(self.folder / FORMAT_FILES["onnx"], cuda=device != "cpu", threads=threads)
            self.providers = self.model.providers
            self.device = "cuda" if CUDA in self.providers else "cpu"
        else:
            try:
                from distilops.predict_torch import TorchModel  # torch: heavy, and absent from the serving images
            except ImportError as exc:
                raise ModelError(f"{self.folder} is a PyTorch model ({self.format}) and this environment has no "
                                 f"torch ({exc}): serve an ONNX variant (distilops package --device cpu|gpu)") from exc
            self.model = TorchModel(self.folder, self.format, device=device, threads=threads)
            self.providers = [f"torch:{self.model.device}"]
            self.device = self.model.device

    def predict_logits(self, texts: Sequence[str]) -> np.ndarray:
        batch, _ = self.encode(texts)
        return self.model(batch)

    def predict_logits_batched(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Logits for any number of texts, `batch_size` at a time, in input order."""
        parts = [self.predict_logits(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), dtype=np.float32)

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        batch, truncated = self.encode(texts)
        probs = softmax(self.model(batch).astype(np.float32))
        ids = probs.argmax(axis=-1)
        return [Prediction(self.labels[i], float(p[i]), t) for i, p, t in zip(ids, probs, truncated, strict=True)]

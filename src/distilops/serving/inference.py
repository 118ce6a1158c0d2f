"""Raw texts -> labels: the folder's tokenizer and an ONNX Runtime session, the one inference path
that evaluation, the registered MLflow model and the BentoML service share.

ONNX folders need neither torch nor transformers: the text is tokenized by `tokenizers` (the Rust
library under transformers' fast tokenizers, reading the folder's tokenizer.json, so the ids are
the same) and the model runs on ONNX Runtime. That is all the serving images carry. A PyTorch
folder runs through the same class with a model the pipeline hands in (pipeline/torch_model.py).

Long texts: a text longer than the window (`max_length` tokens) is split into overlapping windows
(`window_overlap` tokens shared by neighbours, at most `max_windows` per text), the windows of a
batch run through the model together, and a text's logits are the mean of its windows' logits.
Each window costs about what one short text costs, so `max_windows` bounds what one text can cost;
`truncated` is set only when the cap cut a text. The mean of logits beat the mean of
probabilities and the most confident window on the long-text evaluation set (docs/results.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import tokenizers
from pydantic import BaseModel, Field
from tokenizers import Tokenizer

from distilops.errors import ModelError
from distilops.serving.folder import FORMAT_FILES, MAX_WINDOWS, WINDOW_OVERLAP, detect_format, read_json, read_meta
from distilops.serving.session import CUDA, OnnxModel

__all__ = ["CUDA", "Classification", "OnnxModel", "TextClassifier", "TextEncoder", "Windows"]


@dataclass
class Windows:
    """A batch of windows and, per text, the slice of rows that are its windows."""

    batch: dict[str, np.ndarray]  # input_ids, attention_mask, token_type_ids: int64 [windows, longest]
    spans: list[tuple[int, int]]  # text i's windows are rows spans[i][0]:spans[i][1]
    truncated: list[bool]  # the window cap cut the text

    @property
    def windows_per_text(self) -> list[int]:
        return [end - start for start, end in self.spans]


class TextEncoder:
    """The folder's tokenizer with transformers' settings (`padding=True, truncation=True, max_length`,
    `return_overflowing_tokens=True, stride=window_overlap`): each text becomes one or more windows of
    at most `max_length` tokens (special tokens included), right-padded to the longest of the batch."""

    def __init__(self, folder: Path, max_length: int, *, window_overlap: int | None = None,
                 max_windows: int = MAX_WINDOWS) -> None:
        settings = read_json(folder / "tokenizer_config.json")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        pad_token = settings.get("pad_token")
        pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
        pad_id = self.tokenizer.token_to_id(pad_token) if pad_token else None
        if pad_id is None:
            raise ModelError(f"{folder}: the tokenizer has no pad token ({pad_token!r})")
        content = max_length - self.tokenizer.num_special_tokens_to_add(is_pair=False)
        # Unset: the format's default, at most half a window (tiny test windows), so no phrase is only
        # ever seen cut in two.
        window_overlap = min(WINDOW_OVERLAP, content // 2) if window_overlap is None else window_overlap
        if max_windows < 1 or not 0 <= window_overlap < content:
            raise ModelError(f"windows: need max_windows >= 1 and 0 <= window_overlap < {content} (the tokens a "
                             f"window of {max_length} holds besides special tokens); got max_windows={max_windows}, "
                             f"window_overlap={window_overlap}")
        self.max_windows, self.window_overlap = max_windows, window_overlap
        self.tokenizer.no_padding()  # a saved tokenizer.json may pad to a fixed length: count real tokens
        self.tokenizer.no_truncation()
        probe = " ".join(["the"] * 3 * content)
        probe_tokens = len(self.tokenizer.encode(probe, add_special_tokens=False).ids)
        self.tokenizer.enable_truncation(max_length, stride=window_overlap,
                                         direction=settings.get("truncation_side", "right"))
        # tokenizers 0.23.2 returns one overflow window at most, silently dropping the rest of a long text.
        expected = 1 + -(-max(0, probe_tokens - content) // (content - window_overlap))
        got = 1 + len(self.tokenizer.encode(probe).overflowing)
        if got != expected:
            raise ModelError(f"tokenizers {tokenizers.__version__} splits a {probe_tokens}-token text into {got} "
                             f"windows, not {expected}: it would drop the rest of long texts; install "
                             "tokenizers>=0.23.3")
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token,
                                      direction=settings.get("padding_side", "right"))

    def __call__(self, texts: Sequence[str]) -> Windows:
        rows, spans, truncated = [], [], []
        for encoding in self.tokenizer.encode_batch(list(texts)):
            windows = [encoding, *encoding.overflowing][: self.max_windows]
            spans.append((len(rows), len(rows) + len(windows)))
            truncated.append(len(encoding.overflowing) >= self.max_windows)
            rows += windows
        # The tokenizer pads overflow windows too; this only guarantees one width if a version did not.
        width = max((len(e.ids) for e in rows), default=0)
        padding = self.tokenizer.padding
        left = padding["direction"] == "left"

        def column(values: list[list[int]], fill: int) -> np.ndarray:
            padded = [[fill] * (width - len(v)) + v if left else v + [fill] * (width - len(v)) for v in values]
            return np.array(padded, dtype=np.int64).reshape(len(rows), width)

        pad_id, pad_type = padding["pad_id"], padding["pad_type_id"]

        batch = {"input_ids": column([e.ids for e in rows], pad_id),
                 "attention_mask": column([e.attention_mask for e in rows], 0),
                 "token_type_ids": column([e.type_ids for e in rows], pad_type)}
        return Windows(batch, spans, truncated)


class Classification(BaseModel):
    """What the service answers and the registered MLflow model returns, per text."""

    label: str
    score: float = Field(description="probability of the label")
    windows: int = Field(description="windows of max_length tokens the text was read in (1 if it fits one)")
    truncated: bool = Field(description="the text needed more windows than the cap: its end was not read")


class Model(Protocol):
    """What runs a batch of windows: ONNX Runtime here, a torch module in the pipeline."""

    providers: list[str]  # what it really runs on
    device: str  # "cuda" or "cpu"

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray: ...


def mean_over_windows(logits: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """One row of logits per text: the mean over its windows' rows."""
    return np.stack([logits[start:end].mean(axis=0) for start, end in spans]) if spans else logits[:0]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TextClassifier:
    """Tokenizer + model from one folder; `predict_logits` and `classify` work on raw texts.

    ONNX folders run on ONNX Runtime: `device` "cuda" or "cpu" (None = CUDA when available), `threads`
    CPU threads (None = all), `spin_wait` whether idle threads busy-wait (OnnxModel). Other formats need
    their `model` handed in (the pipeline's torch runtime).
    `window_overlap`, `max_windows`: the long-text windows; None = the folder's distilops.json, else the defaults.
    """

    def __init__(self, folder: str | Path, device: str | None = None, threads: int | None = None, *,
                 window_overlap: int | None = None, max_windows: int | None = None, model: Model | None = None,
                 spin_wait: bool = False) -> None:
        self.folder = Path(folder)
        self.format = detect_format(self.folder)
        meta = read_meta(self.folder)
        config = read_json(self.folder / "config.json")
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        self.max_length = int(meta.get("max_length") or 512)
        window_overlap = meta.get("window_overlap") if window_overlap is None else window_overlap
        max_windows = meta.get("max_windows", MAX_WINDOWS) if max_windows is None else max_windows
        self.encode = TextEncoder(self.folder, self.max_length, max_windows=int(max_windows),
                                  window_overlap=None if window_overlap is None else int(window_overlap))
        self.window_overlap, self.max_windows = self.encode.window_overlap, self.encode.max_windows
        if model is None:
            if self.format != "onnx":
                raise ModelError(f"{self.folder} is a PyTorch model ({self.format}); serving runs ONNX folders "
                                 "only: serve an ONNX variant (distilops package --device cpu|gpu)")
            model = OnnxModel(self.folder / FORMAT_FILES["onnx"], cuda=device != "cpu", threads=threads,
                              spin_wait=spin_wait)
        self.model = model
        self.providers, self.device = model.providers, model.device

    def predict_windows(self, texts: Sequence[str]) -> tuple[np.ndarray, Windows]:
        """Logits of every window (float32) and the windows themselves."""
        windows = self.encode(texts)
        return self.model(windows.batch).astype(np.float32), windows

    def predict_logits(self, texts: Sequence[str]) -> np.ndarray:
        """One row of logits per text (the mean over its windows)."""
        logits, windows = self.predict_windows(texts)
        return mean_over_windows(logits, windows.spans)

    def predict_logits_batched(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Logits for any number of texts, `batch_size` texts at a time, in input order."""
        parts = [self.predict_logits(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.labels)), dtype=np.float32)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        logits, windows = self.predict_windows(texts)
        probs = softmax(mean_over_windows(logits, windows.spans))
        ids = probs.argmax(axis=-1)
        return [Classification(label=self.labels[i], score=float(p[i]), windows=n, truncated=t)
                for i, p, n, t in zip(ids, probs, windows.windows_per_text, windows.truncated, strict=True)]

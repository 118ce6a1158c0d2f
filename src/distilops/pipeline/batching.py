"""Tokenized examples, batches and batched inference over them (torch models in training and the
teacher-output cache; raw-text inference for every model format is `serving.inference.TextClassifier`).

- Dynamic padding: each batch is padded to its own longest text, not to max_length.
- Training batches group texts of similar length (seeded), so little compute goes to padding.
- CUDA when available, with bf16 autocast there; the same code runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device) -> AbstractContextManager:
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


@dataclass
class Examples:
    """Tokenized examples, unpadded; optional per-example teacher outputs for distillation."""

    input_ids: list[list[int]]
    labels: np.ndarray
    teacher_logits: np.ndarray | None = None
    teacher_hidden: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "label": int(self.labels[i])}
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits[i]
        if self.teacher_hidden is not None:
            item["teacher_hidden"] = self.teacher_hidden[i]
        return item

    def subset(self, indices: Sequence[int]) -> Examples:
        return Examples(
            input_ids=[self.input_ids[i] for i in indices],
            labels=self.labels[list(indices)],
            teacher_logits=None if self.teacher_logits is None else self.teacher_logits[list(indices)],
            teacher_hidden=None if self.teacher_hidden is None else [self.teacher_hidden[i] for i in indices],
        )


def concat(a: Examples, b: Examples) -> Examples:
    """`a` then `b` (both with teacher outputs, or neither)."""
    return Examples(
        input_ids=a.input_ids + b.input_ids, labels=np.concatenate([a.labels, b.labels]),
        teacher_logits=None if a.teacher_logits is None else np.concatenate([a.teacher_logits, b.teacher_logits]),
        teacher_hidden=None if a.teacher_hidden is None else a.teacher_hidden + b.teacher_hidden,
    )


def tokenize(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> Examples:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Examples(input_ids=ids, labels=np.asarray(labels, dtype=np.int64))


def make_collate(pad_id: int) -> Callable[[list[dict]], dict]:
    def collate(items: list[dict]) -> dict:
        longest = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, it in enumerate(items):
            input_ids[row, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
            mask[row, : len(it["input_ids"])] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "labels": torch.tensor([it["label"] for it in items])}
        if "teacher_logits" in items[0]:
            batch["teacher_logits"] = torch.tensor(np.stack([it["teacher_logits"] for it in items]),
                                                   dtype=torch.float32)
        if "teacher_hidden" in items[0]:
            hidden = torch.zeros((len(items), longest, items[0]["teacher_hidden"].shape[-1]))
            for row, it in enumerate(items):
                hidden[row, : len(it["teacher_hidden"])] = torch.from_numpy(it["teacher_hidden"].astype(np.float32))
            batch["teacher_hidden"] = hidden
        return batch

    return collate


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           group_batches: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length examples (less padding, same randomness for a seed).

    Shuffle all examples, sort each chunk of `group_batches` batches by length, cut it into
    batches, then shuffle the batch order. Batch count equals ceil(n / batch_size).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches: list[list[int]] = []
    chunk = batch_size * group_batches
    for start in range(0, len(order), chunk):
        part = order[start: start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i: i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def loader(data: Examples, batch_size: int, pad_id: int, *, shuffle_seed: int | None = None) -> DataLoader:
    """Batches in data order, or (with a seed) length-grouped shuffled batches."""
    if shuffle_seed is None:
        return DataLoader(data, batch_size=batch_size, collate_fn=make_collate(pad_id))
    batches = length_grouped_batches([len(ids) for ids in data.input_ids], batch_size, shuffle_seed)
    # Its own generator: without one, every iteration draws a seed from the global RNG, which would
    # shift dropout after a resume.
    return DataLoader(data, batch_sampler=batches, collate_fn=make_collate(pad_id),
                      generator=torch.Generator().manual_seed(shuffle_seed))


def shard_batches(batches: list[list[int]], rank: int, size: int) -> tuple[list[list[int]], list[float]]:
    """Rank `rank`'s share of each global batch (every size-th example: the shares cover the batch once) and the
    share's loss weight, its examples x size / the batch's, so that the ranks' weighted mean losses, averaged, are
    the global batch's mean loss. A share left empty (a last batch smaller than the ranks) trains on the batch's
    first example at weight 0: every rank still steps with the others."""
    shares, weights = [], []
    for batch in batches:
        share = batch[rank::size]
        shares.append(share or batch[:1])
        weights.append(len(share) * size / len(batch))
    return shares, weights


def sharded_loader(data: Examples, batch_size: int, pad_id: int, *, shuffle_seed: int, rank: int,
                   size: int) -> tuple[DataLoader, list[float]]:
    """`loader`'s shuffled global batches of `batch_size`, this rank's share of each (and its loss weights): the
    distributed sampler of several training processes."""
    batches = length_grouped_batches([len(ids) for ids in data.input_ids], batch_size, shuffle_seed)
    shares, weights = shard_batches(batches, rank, size)
    return DataLoader(data, batch_sampler=shares, collate_fn=make_collate(pad_id),
                      generator=torch.Generator().manual_seed(shuffle_seed)), weights


def model_inputs(batch: dict, dev: torch.device) -> dict:
    return {k: batch[k].to(dev) for k in ("input_ids", "attention_mask")}


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, data: Examples, pad_id: int, batch_size: int = 64,
                   *, hidden_states: bool = False, desc: str | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits (and, optionally, each example's unpadded last hidden states) in data order.

    Batches are formed from length-sorted examples so little compute goes to padding.
    """
    dev = device()
    model.to(dev).eval()
    order = np.argsort([len(ids) for ids in data.input_ids], kind="stable")
    logits = np.zeros((len(data), model.config.num_labels), dtype=np.float32)
    hidden: list[np.ndarray] = [np.empty(0)] * len(data) if hidden_states else []
    collate = make_collate(pad_id)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, unit="batch"):
        idx = order[start: start + batch_size]
        batch = collate([data[i] for i in idx])
        with autocast(dev):
            out = model(**model_inputs(batch, dev), output_hidden_states=hidden_states)
        logits[idx] = out.logits.float().cpu().numpy()
        if hidden_states:
            last = out.hidden_states[-1].float().cpu().numpy()
            for row, i in enumerate(idx):
                hidden[i] = last[row, : len(data.input_ids[i])].astype(np.float16)
    return logits, hidden


def accuracy(model: torch.nn.Module, data: Examples, pad_id: int, batch_size: int = 64) -> float:
    logits, _ = predict_logits(model, data, pad_id, batch_size)
    return float((logits.argmax(-1) == data.labels).mean())

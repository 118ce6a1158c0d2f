"""One small training loop for teacher and student.

- Dynamic padding: each batch is padded to its own longest text, not to max_length, and
  training batches group texts of similar length (seeded), so little compute goes to padding.
- Seeded: the shuffle of epoch e comes from a generator seeded with (seed, e), so an interrupted
  run resumes at the exact batch where its last checkpoint was taken.
- Checkpoints (model, optimizer, scheduler, step, best so far) are written atomically every
  `checkpoint_every_steps`; `train` picks one up when its fingerprint matches the run's inputs.
- CUDA when available, with bf16 autocast there; the same code runs on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
EvalCallback = Callable[[int, float], None]  # (global step, validation accuracy); may raise to stop


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def model_inputs(batch: dict, dev: torch.device) -> dict:
    return {k: batch[k].to(dev) for k in ("input_ids", "attention_mask")}


def autocast(dev: torch.device):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


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


def cross_entropy_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model(**model_inputs(batch, dev), labels=batch["labels"].to(dev)).loss


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    seed: int = 42
    eval_every_steps: int = 0  # 0 = validate at the end of each epoch only
    checkpoint_every_steps: int = 0  # 0 = no checkpoints
    checkpoint_dir: Path | None = None
    fingerprint: dict = field(default_factory=dict)  # what must match for a checkpoint to be resumed
    progress: str | None = "train"  # tqdm description; None hides the bar


@dataclass
class TrainResult:
    best_accuracy: float
    best_step: int
    steps: int
    seconds: float
    history: list[tuple[int, float]]
    resumed_from_step: int = 0


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    """Every random stream training draws from (dropout included), for an exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint behind


def train(model: torch.nn.Module, train_data: Examples, val_data: Examples, pad_id: int,
          settings: TrainSettings, loss_fn: LossFn = cross_entropy_loss,
          on_eval: EvalCallback | None = None) -> TrainResult:
    """Train `model` in place and leave it holding the weights with the best validation accuracy."""
    dev = device()
    model.to(dev)
    steps_per_epoch = -(-len(train_data) // settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": settings.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)

    step, best_acc, best_step, history = 0, -1.0, 0, []
    best_state: dict | None = None
    ckpt_path = best_path = None
    run_key = fingerprint_hash(settings.fingerprint)
    if settings.checkpoint_dir and settings.checkpoint_every_steps:
        settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = settings.checkpoint_dir / f"{run_key}.pt"
        best_path = settings.checkpoint_dir / f"{run_key}.best.pt"
        if ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # rng states must stay on the CPU
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            step, best_acc, best_step, history = ckpt["step"], ckpt["best_acc"], ckpt["best_step"], ckpt["history"]
            set_rng_state(ckpt["rng"])
            if best_path.exists():
                best_state = torch.load(best_path, map_location="cpu", weights_only=False)
            print(f"[train] resuming from checkpoint at step {step}/{total_steps}", flush=True)
    resumed_from = step

    def evaluate_now() -> None:
        nonlocal best_acc, best_step, best_state
        acc = accuracy(model, val_data, pad_id)
        model.train()
        history.append((step, acc))
        if acc > best_acc:
            best_acc, best_step = acc, step
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if best_path:
                _atomic_save(best_state, best_path)
        if on_eval:
            on_eval(step, acc)

    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc=settings.progress, disable=settings.progress is None,
               unit="step", dynamic_ncols=True)
    model.train()
    for epoch in range(step // steps_per_epoch, settings.epochs):
        batches = loader(train_data, settings.batch_size, pad_id,
                         shuffle_seed=settings.seed * 1000 + epoch)
        skip = step - epoch * steps_per_epoch  # batches of this epoch already trained before a resume
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            with autocast(dev):
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise DivergedError(f"non-finite loss ({loss.item()}) at step {step + 1}: learning rate too "
                                    "high, or half-precision weights? The last checkpoint is kept.")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", best_acc=f"{best_acc:.4f}" if best_acc >= 0 else "-")
            end_of_epoch = i == steps_per_epoch - 1
            if (settings.eval_every_steps and step % settings.eval_every_steps == 0) or (
                end_of_epoch and not (settings.eval_every_steps and step % settings.eval_every_steps == 0)
            ):
                evaluate_now()
            if ckpt_path and (step % settings.checkpoint_every_steps == 0 or end_of_epoch):
                _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "step": step, "best_acc": best_acc,
                              "best_step": best_step, "history": history, "rng": rng_state()}, ckpt_path)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(best_accuracy=best_acc, best_step=best_step, steps=step,
                       seconds=time.perf_counter() - started, history=history, resumed_from_step=resumed_from)


def clear_checkpoints(settings: TrainSettings) -> None:
    """Remove a finished run's checkpoints (its model is saved; nothing left to resume)."""
    if settings.checkpoint_dir:
        key = fingerprint_hash(settings.fingerprint)
        for suffix in (".pt", ".best.pt"):
            (settings.checkpoint_dir / f"{key}{suffix}").unlink(missing_ok=True)

"""One small training loop for teacher and student.

- Seeded: the shuffle of epoch e comes from a generator seeded with (seed, e), so an interrupted
  run resumes at the exact batch where its last checkpoint was taken.
- Checkpoints (model, optimizer, scheduler, RNG states, progress) are written atomically every
  `checkpoint_every_steps`; `train` picks one up when its fingerprint matches the run's inputs.
- The best validation state is kept (in memory and beside the checkpoint) and loaded at the end.
- CUDA when available, with bf16 autocast there (batching.autocast); the same code runs on the CPU.
- On several processes (a `World` from pipeline/distributed.py, under torchrun): each rank trains on its share of
  every global batch inside DistributedDataParallel, its loss weighted by its share so that the averaged gradient
  is the single process's; validation is sharded and its counts summed; rank 0 alone checkpoints (with every
  rank's RNG state) and reports. With one process none of this runs: the same batches, the same draws.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distilops.config import Trained
from distilops.errors import DivergedError
from distilops.hashing import json_sha256
from distilops.pipeline.batching import (
    Examples,
    accuracy,
    autocast,
    device,
    loader,
    model_inputs,
    predict_logits,
    sharded_loader,
)
from distilops.pipeline.distributed import SINGLE, World, average_gradients, gather_objects, sum_all

log = logging.getLogger(__name__)
LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
EvalCallback = Callable[[int, float], None]  # (global step, validation accuracy); may raise to stop
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


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

    @classmethod
    def from_config(cls, cfg: Trained, *, epochs: int, learning_rate: float, **settings: Any) -> TrainSettings:
        """A run of `epochs` at `learning_rate` with a config section's batch size, weight decay, warm-up,
        seed and checkpoint interval (teacher, each tuning trial, the final student); `settings` add or override."""
        from_section = dict(batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                            seed=cfg.seed, checkpoint_every_steps=cfg.checkpoint_every_steps)
        return cls(epochs=epochs, learning_rate=learning_rate, **{**from_section, **settings})


@dataclass
class TrainResult:
    best_accuracy: float
    best_step: int
    steps: int
    seconds: float
    history: list[tuple[int, float]]
    resumed_from_step: int = 0
    losses: list[float] = field(default_factory=list)  # the global batch's loss at each step this run trained


@dataclass
class Progress:
    """What a checkpoint restores besides the weights and optimizer: where the run is, and its best."""

    step: int = 0
    best_acc: float = -1.0
    best_step: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    best_state: dict | None = None  # weights of the best validation accuracy so far (kept on the CPU)


# --- checkpoints ------------------------------------------------------------------------------------


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


def checkpoint_paths(settings: TrainSettings, world: World = SINGLE) -> tuple[Path, Path] | None:
    """(last, best) checkpoint files of this run, named by its fingerprint (and the process count, above one: a
    checkpoint holds each rank's RNG state); None when not checkpointing."""
    if not (settings.checkpoint_dir and settings.checkpoint_every_steps):
        return None
    fingerprint = {**settings.fingerprint, "processes": world.size} if world.distributed else settings.fingerprint
    key = json_sha256(fingerprint)[:16]
    return settings.checkpoint_dir / f"{key}.pt", settings.checkpoint_dir / f"{key}.best.pt"


def atomic_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint behind


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress,
                    extra: torch.nn.Module | None = None, world: World = SINGLE) -> None:
    """Rank 0 writes; on several processes every rank hands it its RNG state first (a collective: all call it)."""
    rng = gather_objects(rng_state(), world) if world.distributed else rng_state()
    if not world.main:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": progress.step, "best_acc": progress.best_acc,
             "best_step": progress.best_step, "history": progress.history, "rng": rng}
    if extra is not None:
        state["extra"] = extra.state_dict()
    atomic_save(state, path)


def load_checkpoint(paths: tuple[Path, Path], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, extra: torch.nn.Module | None = None,
                    world: World = SINGLE) -> Progress:
    """Restore model (and extra), optimizer, scheduler and RNG states in place (each rank its own); return the run's
    progress."""
    last, best = paths
    ckpt = torch.load(last, map_location="cpu", weights_only=False)  # rng states must stay on the CPU
    model.load_state_dict(ckpt["model"])
    if extra is not None:
        extra.load_state_dict(ckpt["extra"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"][world.rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    best_state = torch.load(best, map_location="cpu", weights_only=False) if best.exists() else None
    return Progress(ckpt["step"], ckpt["best_acc"], ckpt["best_step"], ckpt["history"], best_state)


def clear_checkpoints(settings: TrainSettings, world: World = SINGLE) -> None:
    """Remove a finished run's checkpoints (its model is saved; nothing left to resume): rank 0's job."""
    if not world.main:
        return
    for path in checkpoint_paths(settings, world) or ():
        path.unlink(missing_ok=True)


# --- the loop ---------------------------------------------------------------------------------------


def optimizer_and_schedule(model: torch.nn.Module, settings: TrainSettings, total_steps: int,
                           extra: torch.nn.Module | None = None):
    """AdamW without weight decay on biases and norms; linear warm-up, then linear decay to zero."""
    named = list(model.named_parameters())
    if extra is not None:  # appended after the model's: the model's own groups stay in the same order
        named += list(extra.named_parameters(prefix="extra"))
    groups = [{"params": [p for n, p in named if not n.endswith(NO_DECAY)], "weight_decay": settings.weight_decay},
              {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


def sharded_accuracy(model: torch.nn.Module, data: Examples, pad_id: int, world: World) -> float:
    """Accuracy over `data`, each rank scoring its share and the correct answers summed: the same on every rank."""
    mine = world.shard(range(len(data)))
    correct = 0.0
    if mine:
        logits, _ = predict_logits(model, data.subset(mine), pad_id)
        correct = float((logits.argmax(-1) == data.labels[mine]).sum())
    return sum_all(correct, world) / len(data)


def validate(model: torch.nn.Module, val_data: Examples, pad_id: int, progress: Progress,
             best_path: Path | None, world: World = SINGLE) -> float:
    """Validation accuracy at this step; a new best is kept (and saved beside the checkpoint, by rank 0)."""
    acc = sharded_accuracy(model, val_data, pad_id, world) if world.distributed else accuracy(model, val_data, pad_id)
    model.train()
    progress.history.append((progress.step, acc))
    if acc > progress.best_acc:
        progress.best_acc, progress.best_step = acc, progress.step
        progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if best_path and world.main:
            atomic_save(progress.best_state, best_path)
    return acc


def train(model: torch.nn.Module, train_data: Examples, val_data: Examples, pad_id: int,
          settings: TrainSettings, loss_fn: LossFn = cross_entropy_loss,
          on_eval: EvalCallback | None = None, extra: torch.nn.Module | None = None,
          world: World = SINGLE) -> TrainResult:
    """Train `model` in place and leave it holding the weights with the best validation accuracy.

    `extra`: trainable modules the loss uses beside the model (the hidden-state loss's projection):
    optimised, clipped and checkpointed with it, but no part of the model that is validated and kept.
    `world`: the processes training together (module docstring); `on_eval` is called on rank 0 only."""
    dev = device()
    model.to(dev)
    trainable = list(model.parameters())
    if extra is not None:
        extra.to(dev)
        trainable += list(extra.parameters())
    steps_per_epoch = -(-len(train_data) // settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    optimizer, scheduler = optimizer_and_schedule(model, settings, total_steps, extra)
    paths = checkpoint_paths(settings, world)
    progress = Progress()
    net = model  # what the loss calls: the model, or (several processes) its DistributedDataParallel wrapper
    if world.distributed:
        seed_everything(settings.seed + world.rank)  # each rank its own dropout
    if paths and paths[0].exists():
        progress = load_checkpoint(paths, model, optimizer, scheduler, extra, world)
        log.info("resuming from checkpoint at step %d/%d", progress.step, total_steps)
    if world.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()]
                                                        if dev.type == "cuda" else None)
    resumed_from = progress.step
    losses: list[float] = []

    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=progress.step, desc=settings.progress,
               disable=settings.progress is None or not world.main, unit="step", dynamic_ncols=True)
    model.train()
    try:
        for epoch in range(progress.step // steps_per_epoch, settings.epochs):
            shuffle_seed = settings.seed * 1000 + epoch
            if world.distributed:
                batches, weights = sharded_loader(train_data, settings.batch_size, pad_id, shuffle_seed=shuffle_seed,
                                                  rank=world.rank, size=world.size)
            else:
                batches, weights = loader(train_data, settings.batch_size, pad_id, shuffle_seed=shuffle_seed), None
            done_in_epoch = progress.step - epoch * steps_per_epoch  # batches trained before a resume
            for i, batch in enumerate(batches):
                if i < done_in_epoch:
                    continue
                with autocast(dev):
                    loss = loss_fn(net, batch)
                if not torch.isfinite(loss):
                    raise DivergedError(f"non-finite loss ({loss.item()}) at step {progress.step + 1}: learning "
                                        "rate too high, or half-precision weights? The last checkpoint is kept.")
                if weights is None:
                    loss.backward()
                    losses.append(loss.item())
                else:  # DDP averages the ranks' gradients: weighted, they average to the global batch's
                    (loss * weights[i]).backward()
                    if extra is not None:
                        average_gradients(extra, world)
                    losses.append(sum_all(loss.item() * weights[i], world) / world.size)
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                bar.update(1)
                best = f"{progress.best_acc:.4f}" if progress.best_acc >= 0 else "-"
                bar.set_postfix(loss=f"{losses[-1]:.4f}", best_acc=best)
                end_of_epoch = i == steps_per_epoch - 1
                if end_of_epoch or (settings.eval_every_steps and progress.step % settings.eval_every_steps == 0):
                    acc = validate(model, val_data, pad_id, progress, paths and paths[1], world)
                    if on_eval and world.main:
                        on_eval(progress.step, acc)
                if paths and (progress.step % settings.checkpoint_every_steps == 0 or end_of_epoch):
                    save_checkpoint(paths[0], model, optimizer, scheduler, progress, extra, world)
    finally:
        bar.close()  # also when a pruner, a divergence or Ctrl-C ends the run
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    return TrainResult(best_accuracy=progress.best_acc, best_step=progress.best_step, steps=progress.step,
                       seconds=time.perf_counter() - started, history=progress.history, resumed_from_step=resumed_from,
                       losses=losses)

"""Training on several processes (GPUs, or machines): PyTorch's own engine, torch.distributed under torchrun.

A stage whose params section says `distributed.processes` (per node) x `distributed.nodes` > 1 re-executes itself
through torchrun (`python -m torch.distributed.run`), which starts the processes, gives each its RANK, WORLD_SIZE and
LOCAL_RANK, and restarts them all (`distributed.restarts` times) when one dies: they resume from the last
checkpoint. A process torchrun started (RANK and WORLD_SIZE set) joins the process group instead. So dvc.yaml's
command stays `python stages/<stage>.py`, and DVC sees one command whatever the process count.

With one process (the default) nothing here runs: no process group, no sampler, no new random draw, so the
single-process path is today's, number for number.

What training does with a `World` (training.train): every process takes its share of each global batch (the
batch params.yaml names, cut across the ranks), DistributedDataParallel averages the gradients, the loss is
weighted so the update equals the single process's; validation is sharded and its counts all-reduced, so every
rank sees the same accuracy and keeps the same best epoch; rank 0 alone writes checkpoints, the model folder and
MLflow's run.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from distilops import settings
from distilops.config import Distributed
from distilops.errors import ConfigError, SettingError

log = logging.getLogger(__name__)
# A rank may wait long for another at a collective (rank 0 alone runs the distill stage's study): torchrun, not
# this timeout, notices a dead process (it restarts the group), so the timeout only bounds a hang.
GROUP_TIMEOUT = datetime.timedelta(hours=12)
SHARED_STORE_OFF = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, outputs and MLflow's run."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: Sequence[int]) -> list[int]:
        """This rank's share of `items` (every size-th, from its rank): the shares cover `items` once."""
        return list(items[self.rank::self.size])


SINGLE = World()


def backend_for(cfg: Distributed) -> str:
    """The process group backend: nccl with CUDA GPUs, gloo on CPUs (auto); nccl asked without CUDA is refused."""
    cuda = torch.cuda.is_available()
    if cfg.backend == "auto":
        return "nccl" if cuda else "gloo"
    if cfg.backend == "nccl" and not cuda:
        raise ConfigError("params.yaml: distributed.backend: nccl needs CUDA GPUs and this machine has none: "
                          "use gloo (or auto) on CPUs")
    if cfg.backend == "nccl" and cfg.processes > torch.cuda.device_count():
        raise ConfigError(f"params.yaml: distributed.processes: {cfg.processes} processes with nccl need as many "
                          f"GPUs per node; this machine has {torch.cuda.device_count()}")
    return cfg.backend


def is_torchrun_worker() -> bool:
    """Started by torchrun (it sets RANK and WORLD_SIZE): join the group instead of launching."""
    return settings.RANK.read() is not None and settings.WORLD_SIZE.read() is not None


def launch_command(cfg: Distributed, stage: str, script: str, args: Sequence[str] = ()) -> list[str]:
    """torchrun's command line for `script`: standalone on one node; with several, the c10d rendezvous at
    DISTILOPS_RENDEZVOUS (host:port of the first node: Kubernetes' headless Service name, k8s/jobs)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.processes}",
               f"--max-restarts={cfg.restarts}"]
    if cfg.nodes == 1:
        command.append("--standalone")
    else:
        endpoint = settings.RENDEZVOUS.read()
        if not endpoint:
            raise SettingError(f"distributed.nodes is {cfg.nodes}: set {settings.RENDEZVOUS.name} to the first "
                               "node's host:port (every node runs this stage; k8s/jobs/train-job.yaml sets it)")
        command += [f"--nnodes={cfg.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                    f"--rdzv-id={settings.RENDEZVOUS_ID.read() or 'distilops-' + stage}"]
    return [*command, script, *args]


@contextmanager
def session(cfg: Distributed, stage: str) -> Iterator[World]:
    """The world a stage trains in. One process: SINGLE, nothing started. Several, outside torchrun: this process
    becomes torchrun, running this script as many times (it never returns here). Inside torchrun: the process
    group joined (and left after a last barrier: every rank waits for rank 0's outputs)."""
    if cfg.processes * cfg.nodes == 1:
        yield SINGLE
        return
    backend = backend_for(cfg)  # bad input stops here, before any process starts
    if not is_torchrun_worker():
        command = launch_command(cfg, stage, sys.argv[0], sys.argv[1:])
        log.info("%s: %d process(es) x %d node(s) through torchrun (%s)", stage, cfg.processes, cfg.nodes, backend)
        sys.stdout.flush()
        sys.stderr.flush()
        # Workers keep their own store per attempt: with the agent's shared one, a restarted group reads the dead
        # attempt's addresses and cannot connect (pytorch/pytorch#135712).
        os.environ[SHARED_STORE_OFF] = "1"
        os.execv(sys.executable, command)
    world = World(settings.RANK.read(), settings.WORLD_SIZE.read(), settings.LOCAL_RANK.read())
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)  # "cuda" is then this process's own GPU
    torch.distributed.init_process_group(backend, timeout=GROUP_TIMEOUT)
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)  # one log: rank 0's
    try:
        yield world
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


# --- collectives training uses (each is a no-op with one process) ------------------------------------------


def sum_all(value: float, world: World) -> float:
    """`value` summed over the ranks."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


def gather_objects(value: object, world: World) -> list[object]:
    """Every rank's `value`, in rank order (on every rank)."""
    if not world.distributed:
        return [value]
    values: list[object] = [None] * world.size
    torch.distributed.all_gather_object(values, value)
    return values


def broadcast_object(value: object, world: World) -> object:
    """Rank 0's `value`, on every rank."""
    if not world.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(module: torch.nn.Module, world: World) -> None:
    """Average `module`'s gradients over the ranks, as DistributedDataParallel does for the model (for a module the
    loss trains beside it: the hidden-state loss's projection)."""
    if not world.distributed:
        return
    for param in module.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad)
            param.grad /= world.size

"""The latency axis of the depth frontier: each student depth's served variant (ONNX Runtime int8, what CPU
nodes serve), timed at batch 1 beside the PyTorch fp32 teacher, on this machine.

Latency depends on a student's shape, not on its weights, so each depth is measured once, on a student just
built from the teacher (no training), before the trials: a trial costs only its training. Every model answers
the same median-length validation text; models take turns in rounds (noise hits all of them alike) and each
reports the median of its calls (`calls` rounded up to whole rounds). The session is the service's own
(serving/session.py: threads sleep when idle), without the tokenizer: the text is tokenized once, here.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from distilops.pipeline.modeling import build_student, save_model_folder
from distilops.pipeline.quantize import FORMAT_FILES, export_onnx, quantize_onnx_int8
from distilops.serving.session import OnnxModel

log = logging.getLogger(__name__)
ROUNDS = 3
TEACHER = "teacher"  # the key of the teacher's latency beside the depths'


def onnx_call(folder: Path, input_ids: list[int], threads: int) -> Callable[[], object]:
    """One batch-1 call of the folder's ONNX model on the CPU, set up as CPU pods serve it."""
    model = OnnxModel(folder / FORMAT_FILES["onnx"], cuda=False, threads=threads)
    ids = np.asarray([input_ids], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return lambda: model(feed)


def torch_call(model: torch.nn.Module, input_ids: list[int]) -> Callable[[], object]:
    ids = torch.tensor([input_ids], dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def call() -> object:
        with torch.inference_mode():
            return model(**inputs).logits
    return call


def median_text(input_ids: list[list[int]]) -> list[int]:
    """The token ids of a median-length text: what every model is timed on."""
    return sorted(input_ids, key=len)[len(input_ids) // 2]


def calls_made(n: int) -> int:
    """How many timed calls `time_calls(..., n)` makes of each model: whole rounds."""
    return ROUNDS * -(-n // ROUNDS)


def time_calls(calls: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """Median ms per call of each, over `calls_made(n)` calls (`n` rounded up to whole rounds) in ROUNDS interleaved
    rounds, after one warm-up call."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        call()
    for _ in range(ROUNDS):
        for key, call in calls.items():
            for _ in range(calls_made(n) // ROUNDS):
                started = time.perf_counter()
                call()
                times[key].append(1000 * (time.perf_counter() - started))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(teacher: torch.nn.Module, tokenizer, depths: list[int], input_ids: list[int], *, calls: int,
            max_length: int, threads: int | None = None) -> dict[str, float]:
    """{str(depth): ms, "teacher": ms}: batch-1 p50 of each depth's ONNX int8 student and the PyTorch teacher."""
    threads = threads or torch.get_num_threads()
    timed: dict[str, Callable[[], object]] = {}
    with tempfile.TemporaryDirectory(prefix="depth-latency-") as scratch:
        for depth in depths:
            root = Path(scratch) / str(depth)
            save_model_folder(build_student(teacher, depth), tokenizer, root / "student", max_length=max_length,
                              role="student")
            int8 = quantize_onnx_int8(export_onnx(root / "student", root / "onnx_fp32"), root / "onnx_int8")
            timed[str(depth)] = onnx_call(int8, input_ids, threads)
        on_cpu = teacher if next(teacher.parameters()).device.type == "cpu" else copy.deepcopy(teacher).cpu()
        timed[TEACHER] = torch_call(on_cpu.eval(), input_ids)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            latency = time_calls(timed, calls)
        finally:
            torch.set_num_threads(previous)
    log.info("served latency at batch 1 (%d tokens, median of %d calls): %s", len(input_ids), calls_made(calls),
             ", ".join(f"{k}{'' if k == TEACHER else ' layers'} {v:.2f} ms" for k, v in latency.items()))
    return latency

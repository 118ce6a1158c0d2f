"""The latency axis of the depth frontier: each student depth's served variant (ONNX Runtime int8, what CPU
nodes serve) timed at batch 1 beside the teacher, on this machine, and how much faster than the teacher each is.

The teacher runs in the same runtime as the students: its fp32 ONNX export, built by the exporter the quantize
stage builds models/teacher_onnx with (the release's shadow model). Timing the teacher in PyTorch let load decide
the choice: PyTorch's threads slow far more than ONNX Runtime's when another process takes a core, so the same
depth read 3.6x the teacher on a quiet machine and 5.5x on a busy one.

Latency depends on a student's shape, not on its weights, so each depth is measured once, on a student just
built from the teacher (no training), before the trials: a trial costs only its training. Every model answers
the same median-length validation text, in interleaved rounds: each round calls every model once, in an order
rotated from round to round, so load that comes and goes hits every model alike. A depth's speedup is the median
of its per-round ratios (teacher's time / its time in the same round): paired, so what slows a whole round
cancels. Quartiles of both are kept with the medians (the spread), in the study, so every later choice reads the
same numbers and can say how firm they are. The session is the service's own (serving/session.py: threads sleep
when idle), without the tokenizer: the text is tokenized once, here.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from distilops.pipeline.modeling import build_student, save_model_folder
from distilops.pipeline.quantize import FORMAT_FILES, export_onnx, export_teacher, quantize_onnx_int8
from distilops.serving.session import OnnxModel

log = logging.getLogger(__name__)
TEACHER = "teacher"  # the teacher's key beside the depths'
METHOD = "onnxruntime: fp32 teacher export vs int8 students, batch 1, interleaved rounds, paired ratios"


def onnx_call(folder: Path, input_ids: list[int], threads: int) -> Callable[[], object]:
    """One batch-1 call of the folder's ONNX model on the CPU, set up as CPU pods serve it."""
    model = OnnxModel(folder / FORMAT_FILES["onnx"], cuda=False, threads=threads)
    ids = np.asarray([input_ids], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return lambda: model(feed)


def median_text(input_ids: list[list[int]]) -> list[int]:
    """The token ids of a median-length text: what every model is timed on."""
    return sorted(input_ids, key=len)[len(input_ids) // 2]


def time_rounds(calls: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """ms of every call: one warm-up call each, then `rounds` rounds, each calling every model once, the order
    rotated by one from round to round (no model always runs first or after the same one)."""
    keys = list(calls)
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            started = time.perf_counter()
            calls[key]()
            times[key].append(1000 * (time.perf_counter() - started))
    return times


def quartiles(values: list[float]) -> dict[str, float]:
    p25, p50, p75 = np.percentile(values, [25, 50, 75])
    return {"p25": float(p25), "p50": float(p50), "p75": float(p75)}


def summarise(times: Mapping[str, list[float]]) -> dict:
    """Each model's latency quartiles (ms) and each depth's speedup quartiles: per-round ratios to the teacher."""
    teacher = np.asarray(times[TEACHER])
    return {"latency_ms": {k: quartiles(v) for k, v in times.items()},
            "speedup": {k: quartiles(list(teacher / np.asarray(v))) for k, v in times.items() if k != TEACHER}}


def latency_ms(measured: Mapping, key: str) -> float:
    """The median batch-1 latency of depth `key` (or the teacher) in a `measure` result."""
    return measured["latency_ms"][key]["p50"]


def speedup(measured: Mapping, depth: str) -> float:
    """Depth `depth`'s median paired speedup over the teacher in a `measure` result."""
    return measured["speedup"][depth]["p50"]


def build_calls(teacher: torch.nn.Module, tokenizer, depths: list[int], input_ids: list[int], scratch: Path, *,
                max_length: int, threads: int) -> dict[str, Callable[[], object]]:
    """A batch-1 call of each depth's ONNX int8 student (built from the teacher, untrained) and of the teacher's
    fp32 ONNX export, on `input_ids`, keys str(depth) and "teacher"; their files under `scratch`."""
    timed: dict[str, Callable[[], object]] = {}
    for depth in depths:
        root = scratch / str(depth)
        save_model_folder(build_student(teacher, depth), tokenizer, root / "student", max_length=max_length,
                          role="student")
        int8 = quantize_onnx_int8(export_onnx(root / "student", root / "onnx_fp32"), root / "onnx_int8")
        timed[str(depth)] = onnx_call(int8, input_ids, threads)
    folder = save_model_folder(teacher, tokenizer, scratch / TEACHER / "pytorch", max_length=max_length)
    timed[TEACHER] = onnx_call(export_teacher(folder, scratch / TEACHER / "onnx"), input_ids, threads)
    return timed


def measure(teacher: torch.nn.Module, tokenizer, depths: list[int], input_ids: list[int], *, calls: int,
            max_length: int, threads: int | None = None) -> dict:
    """Batch-1 latency of each depth's ONNX int8 student and of the teacher's ONNX fp32 export, `calls` interleaved
    rounds: {"method", "calls", "threads", "tokens", "latency_ms": {key: quartiles}, "speedup": {depth: quartiles}},
    keys str(depth) and "teacher"."""
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="depth-latency-") as scratch:
        timed = build_calls(teacher, tokenizer, depths, input_ids, Path(scratch), max_length=max_length,
                            threads=threads)
        times = time_rounds(timed, calls)
    measured = {"method": METHOD, "calls": calls, "threads": threads, "tokens": len(input_ids), **summarise(times)}
    log.info("served latency at batch 1 (%d tokens, %d interleaved rounds; median [quartiles]): %s",
             len(input_ids), calls, ", ".join(
                 f"{k}{'' if k == TEACHER else ' layers'} {q['p50']:.2f} ms [{q['p25']:.2f}, {q['p75']:.2f}]"
                 + ("" if k == TEACHER else " = {p50:.2f}x [{p25:.2f}, {p75:.2f}]".format(**measured["speedup"][k]))
                 for k, q in measured["latency_ms"].items()))
    return measured

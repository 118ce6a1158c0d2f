"""The ONNX Runtime session, set up once for everything that runs an ONNX model folder: the service and
evaluation (through serving/inference.py's TextClassifier) and the distill stage's latency axis
(pipeline/served_latency.py), so the latency a student depth is chosen by is measured as it will be served.

Its own module, apart from inference.py, so a training stage that times sessions depends on how sessions are
set up and on nothing else of serving: an edit to the tokenizer or the service reruns no training.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

CUDA = "CUDAExecutionProvider"


class OnnxModel:
    """An ONNX Runtime session: CUDA first when asked for and present, the CPU otherwise.

    `spin_wait`: ONNX Runtime's idle CPU threads busy-wait for the next piece of work by default. That
    saves a little latency, but a spinning thread counts as a busy core, so a pod's CPU utilisation (what a
    CPU HorizontalPodAutoscaler scales on) reads high at any load; off unless asked for
    (benchmarks/ort_spinning.py measures both)."""

    def __init__(self, path: Path, *, cuda: bool, threads: int | None, spin_wait: bool = False) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spin_wait else "0")
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

    @property
    def device(self) -> str:
        return "cuda" if CUDA in self.providers else "cpu"

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: v for k, v in batch.items() if k in self.inputs})[0]

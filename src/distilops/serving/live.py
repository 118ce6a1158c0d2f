"""Live fidelity in the service: what every answered text feeds (Prometheus metrics, the drift window), and the
shadow model that scores a sample of them off the request path. service.py reads the settings from the
environment and wires these in; see its docstring for what a user sees.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distilops.serving.fidelity import (
    CONFIDENCE_EDGES,
    WINDOWS_EDGES,
    WORDS_EDGES,
    LiveDrift,
    RollingCounts,
    bin_indices,
)
from distilops.serving.folder import MODEL_SUBDIR, SHADOW_SUBDIR, read_meta
from distilops.serving.inference import TextClassifier

SHADOW_NICE = 10  # the shadow thread's niceness (Linux): where it shares a core with the model, it yields it
SHADOW_MAX_WAIT_S = 0.1  # a serial shadow waits this long for the model to be idle, then goes before its next call
LOG_EVERY_SECONDS = 60.0  # a recurring failure off the request path is logged at most this often
log = logging.getLogger("distilops.service")


class Throttled:
    """A recurring failure off the request path, logged with its traceback at most once per `every_s` seconds
    (with how many happened since the last line), so a broken shadow cannot flood the log."""

    def __init__(self, what: str, every_s: float = LOG_EVERY_SECONDS) -> None:
        self.what, self.every_s = what, every_s
        self.last, self.unlogged = -math.inf, 0

    def failed(self) -> None:
        """Call from an `except` block."""
        self.unlogged += 1
        if time.monotonic() - self.last >= self.every_s:
            log.exception("%s (%d time(s) since the last report; reported at most every %.0f s)", self.what,
                          self.unlogged, self.every_s)
            self.last, self.unlogged = time.monotonic(), 0


class Metrics:
    """The Prometheus metrics of live fidelity, every series labelled with the served registry version.

    Created in the worker, never at import: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker after importing this
    module, and prometheus_client picks its multiprocess mode when it is first imported. The metrics join no registry
    (BentoML's /metrics reads every worker's files); gauges take the most recent value of the live workers.
    """

    def __init__(self, version: str, labels: Sequence[str]) -> None:
        import prometheus_client as prom

        self.version = version
        by_version = ("model_version",)
        predictions = prom.Counter("distilops_predictions", "Texts answered, per predicted label",
                                   (*by_version, "label"), registry=None)
        self.predictions = {label: predictions.labels(version, label) for label in labels}  # all exported from 0

        def histogram(name: str, doc: str, edges: Sequence[float]) -> Any:
            return prom.Histogram(name, doc, by_version, buckets=edges, registry=None).labels(version)

        def counter(name: str, doc: str) -> Any:
            return prom.Counter(name, doc, by_version, registry=None).labels(version)

        def gauge(name: str, doc: str, labelnames: Sequence[str] = by_version) -> Any:
            return prom.Gauge(name, doc, labelnames, registry=None, multiprocess_mode="livemostrecent")

        self.histograms = (
            (histogram("distilops_prediction_confidence", "Probability of the predicted label", CONFIDENCE_EDGES),
             CONFIDENCE_EDGES),
            (histogram("distilops_text_words", "Whitespace-separated words per text", WORDS_EDGES), WORDS_EDGES),
            (histogram("distilops_text_windows", "Windows of max_length tokens a text was read in", WINDOWS_EDGES),
             WINDOWS_EDGES),
        )
        self.batched = all(batchable(child, edges) for child, edges in self.histograms)
        self.compared = counter("distilops_shadow_compared", "Texts the shadow model scored too")
        self.agreed = counter("distilops_shadow_agreed", "Texts the shadow model gave the served label")
        self.dropped = counter("distilops_shadow_dropped", "Texts sampled for the shadow but dropped: queue full")
        self.failed = counter("distilops_shadow_failed", "Texts the shadow model failed to score (logged)")
        # Gauges appear once they have a value: no agreement before a comparison, no PSI before enough texts.
        self.live_agreement = gauge("distilops_live_agreement", "Agreement with the shadow model over the last "
                                    "DISTILOPS_DRIFT_WINDOW compared texts")
        self.drift_psi = gauge("distilops_drift_psi", "PSI of the last DISTILOPS_DRIFT_WINDOW texts vs the reference",
                               (*by_version, "feature"))
        self.reference_agreement = gauge("distilops_reference_agreement", "The evaluated agreement with the teacher "
                                         "(test split) and its 95% interval", (*by_version, "bound"))

    def observe(self, labels: Sequence[str], confidence: Sequence[float], words: Sequence[int],
                windows: Sequence[int]) -> None:
        for label, n in collections.Counter(labels).items():
            self.predictions[label].inc(n)
        for (child, edges), values in zip(self.histograms, (confidence, words, windows), strict=True):
            if self.batched:
                observe_all(child, values, edges)
            else:
                for value in values:
                    child.observe(value)

    def set_drift(self, psi: dict[str, float]) -> None:
        for feature, value in psi.items():
            self.drift_psi.labels(self.version, feature).set(value)

    def set_reference(self, reference: dict) -> None:
        low, high = reference["agreement_with_teacher_ci"]
        for bound, value in (("point", reference["agreement_with_teacher"]), ("low", low), ("high", high)):
            self.reference_agreement.labels(self.version, bound).set(float(value))


def batchable(child: Any, edges: Sequence[float]) -> bool:
    """Whether a histogram child keeps what `observe_all` updates: a count per bucket of these edges, and the sum."""
    return (getattr(child, "_upper_bounds", None) == [*map(float, edges), math.inf]
            and len(getattr(child, "_buckets", ())) == len(edges) + 1 and hasattr(child, "_sum"))


def observe_all(child: Any, values: Sequence[float], edges: Sequence[float]) -> None:
    """`child.observe(value)` for every value, as one increment per non-empty bucket plus one of the sum.

    prometheus_client has no batch observe, and each observation writes the multiprocess files twice: per text and
    histogram that was ~2.5 us, 0.5 ms for a batch of 64 (1% of a CPU model call, far more of a GPU one). Its
    histogram children keep per-bucket counts in `_buckets` (value <= bound, as fidelity.bin_index) and the total in
    `_sum`; `batchable` checks them once, else Metrics observes one value at a time.
    """
    counts = np.bincount(bin_indices(values, edges), minlength=len(edges) + 1)
    for i in np.flatnonzero(counts):
        child._buckets[i].inc(int(counts[i]))
    child._sum.inc(float(sum(values)))


class Turns:
    """Model calls and shadow calls taking turns on the pod's CPUs: a shadow call never overlaps a model call.

    A pod's CPU limit is a CFS quota: the pod's threads together get `limit` CPU-seconds per 100 ms period, and a
    pod that runs more threads than that on a node with free cores uses its quota up early and is stopped for the
    rest of the period, model threads included (nice does not help: the quota counts every thread). ONNX Runtime's
    threads are sized to the limit, so a shadow running alongside them oversubscribes it (benchmarks/shadow_quota.py
    measured the throttling). Taking turns, the model's threads alone fill the limit, and the shadow's work comes
    out of the model's time in whole calls instead of as stalls.

    Model calls may overlap each other (BentoML may run batches on several threads). The shadow goes while no model
    call runs; once it has waited `max_wait_s` for that, new model calls wait until its call ends (one batch of at
    most DISTILOPS_SHADOW_BATCH texts), so a saturated pod still compares some texts.
    """

    def __init__(self, max_wait_s: float = SHADOW_MAX_WAIT_S) -> None:
        self.max_wait_s = max_wait_s
        self.changed = threading.Condition()
        self.models = 0  # model calls running
        self.shadow_turn = False  # the shadow runs, or waits for the running model calls: none starts meanwhile

    @contextlib.contextmanager
    def model(self) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: not self.shadow_turn)
            self.models += 1
        try:
            yield
        finally:
            with self.changed:
                self.models -= 1
                self.changed.notify_all()

    @contextlib.contextmanager
    def shadow(self) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: self.models == 0, timeout=self.max_wait_s)
            self.shadow_turn = True
            self.changed.wait_for(lambda: self.models == 0)
        try:
            yield
        finally:
            with self.changed:
                self.shadow_turn = False
                self.changed.notify_all()


class Shadow:
    """The shadow model scoring a sample of the served texts on a daemon thread: `offer` (request path) samples and
    puts without waiting, dropping a text when the queue is full; the thread scores what is queued in batches of at
    most `batch` texts and counts agreement with the served labels. With `turns` its calls take turns with the
    model's (Turns); without, they run alongside them. Its failures are counted and logged, never raised."""

    def __init__(self, classifier: TextClassifier, metrics: Metrics, *, rate: float, queue_size: int,
                 window: int, batch: int = 64, turns: Turns | None = None) -> None:
        self.classifier, self.metrics, self.rate = classifier, metrics, rate
        self.batch, self.turns = batch, turns
        self.queue: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=queue_size)  # None: wake up, stop
        self.stopping = threading.Event()
        self.agreement = RollingCounts(2, window)  # bin 1: agreed
        self.sample = random.Random().random
        self.failures = Throttled("shadow model failed; the texts it was scoring are not compared")
        self.thread = threading.Thread(target=self.run, name="distilops-shadow", daemon=True)
        self.thread.start()

    def offer(self, texts: Sequence[str], labels: Sequence[str]) -> None:
        dropped = 0
        for text, label in zip(texts, labels, strict=True):
            if self.sample() < self.rate:
                try:
                    self.queue.put_nowait((text, label))
                except queue.Full:
                    dropped += 1
        if dropped:
            self.metrics.dropped.inc(dropped)

    def take(self) -> list[tuple[str, str]]:
        """The next batch: waits for one text, then takes what else is queued, up to `batch`."""
        batch = [self.queue.get()]
        with contextlib.suppress(queue.Empty):
            while len(batch) < self.batch:
                batch.append(self.queue.get_nowait())
        return [item for item in batch if item is not None]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let the thread finish its batch and end: a process that exits during an ONNX Runtime call aborts."""
        self.stopping.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)  # wakes the thread if it waits on an empty queue
        self.thread.join(timeout_s)

    def run(self) -> None:
        with contextlib.suppress(OSError):  # Linux: a thread's own niceness; elsewhere it runs at normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
        while not self.stopping.is_set():
            batch = self.take()
            if not batch:
                continue
            try:
                self.compare(batch)
            except Exception:
                self.metrics.failed.inc(len(batch))
                self.failures.failed()

    def compare(self, batch: list[tuple[str, str]]) -> None:
        texts, served = zip(*batch, strict=True)
        with self.turns.shadow() if self.turns else contextlib.nullcontext():
            answers = self.classifier.classify(texts)
        agreed = [answer.label == label for answer, label in zip(answers, served, strict=True)]
        self.metrics.compared.inc(len(agreed))
        self.metrics.agreed.inc(sum(agreed))
        self.agreement.add(agreed)
        self.metrics.live_agreement.labels(self.metrics.version).set(self.agreement.fractions()[1])


def shadow_meta(folder: Path, bento_metadata: dict) -> dict:
    """What /model says the shadow model is: its folder's record, and its registry version (the folder's, else the
    release's `release.shadow` tag that packaging copied into the Bento model's metadata)."""
    meta = read_meta(folder)
    return {"teacher": meta.get("source_model") or meta.get("teacher"), "role": meta.get("role"),
            "variant": meta.get("variant"), "format": meta.get("format"),
            "registry_version": meta.get("registry_version") or bento_metadata.get("release.shadow")}


def open_shadow(root: Path, served: TextClassifier, metrics: Metrics, bento_metadata: dict, *, rate: float,
                queue_size: int, threads: int, window: int, device: str, batch: int = 64,
                turns: Turns | None = None) -> tuple[Shadow | None, dict]:
    """The shadow scorer when the rate is > 0 and the Bento model has one, and what /model says of it."""
    folder = root / SHADOW_SUBDIR
    info: dict[str, Any] = {"enabled": False, "rate": rate, "queue": queue_size, "threads": threads,
                            "batch": batch, "serial": turns is not None,
                            "model": shadow_meta(folder, bento_metadata) if folder.is_dir() else None}
    if rate == 0:
        return None, {**info, "reason": "DISTILOPS_SHADOW_RATE is 0"}
    if not folder.is_dir():
        reason = (f"no shadow model: the Bento model has no {SHADOW_SUBDIR}/ folder beside {MODEL_SUBDIR}/ (package a "
                  "release registered with its teacher)")
        log.warning("DISTILOPS_SHADOW_RATE=%s but %s; serving without live agreement", rate, reason)
        return None, {**info, "reason": reason}
    try:
        classifier = TextClassifier(folder, device=device, threads=threads,
                                    window_overlap=served.window_overlap, max_windows=served.max_windows)
    except Exception as exc:  # the shadow is optional: serve without it, and say why
        log.exception("the shadow model in %s did not load; serving without live agreement", folder)
        return None, {**info, "reason": f"the shadow model did not load: {exc}"}
    shadow = Shadow(classifier, metrics, rate=rate, queue_size=queue_size, window=window, batch=batch, turns=turns)
    model = {**info["model"], "format": classifier.format, "device": classifier.device,
             "providers": classifier.providers}
    return shadow, {**info, "enabled": True, "model": model}


def open_drift(reference: dict | None, labels: Sequence[str], window: int) -> tuple[LiveDrift | None, dict]:
    """The rolling drift window when the model folder carries a usable reference, and what /model says of it."""
    info: dict[str, Any] = {"enabled": False, "window": window}
    if not reference:
        return None, {**info, "reason": "no reference: the model folder's distilops.json has none (evaluate and "
                                        "register the model with this code)"}
    try:
        drift = LiveDrift(reference, labels, window)
    except ValueError as exc:
        log.warning("no drift gauges: %s", exc)
        return None, {**info, "reason": str(exc)}
    return drift, {**info, "enabled": True, "min_texts": drift.min_texts}


def reference_summary(reference: dict | None) -> dict | None:
    if not reference:
        return None
    return {k: reference.get(k) for k in ("split", "texts", "agreement_with_teacher", "agreement_with_teacher_ci")}

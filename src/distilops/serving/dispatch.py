"""Two corrections to BentoML's adaptive batching (its CorkDispatcher), applied by the service in its worker:
a lone request is not held for a wait learned under load, and a request it sheds is one log line, not a traceback;
and how a batch goes to the model: in calls of texts of like length. Kept apart from service.py so they can be
tested without a server (tests/test_dispatch.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

LIGHT_BATCHES = 3  # this many model calls in a row of one request each: traffic is light, a request waits for none


def wait_only_under_load() -> None:
    """BentoML's batcher (CorkDispatcher) holds a queue shorter than the batch limit while `n * (age of the newest
    request + 1 ms + per-text cost) <= 0.95 * Optimizer.wait`, where `wait` is the mean wait it observed: a fixed
    point, so once learned (under load, or while it trains) a lone request keeps waiting that long, ~40 ms for a
    ~2 ms model, 150 ms after a burst. Here `wait` reads 0 while the last LIGHT_BATCHES model calls each carried one
    request (nobody else to wait for), and BentoML's learned value otherwise: under load batching is BentoML's own,
    so its throughput is kept. Its latency budget and shedding (max_latency_ms) are untouched."""
    from bentoml._internal.marshal.dispatcher import Optimizer

    def learned_or_none(self: Any) -> float:
        recent = list(self.o_stat)[-LIGHT_BATCHES:]  # (requests, duration, wait) of the latest model calls
        if len(recent) == LIGHT_BATCHES and all(n == 1 for n, _, _ in recent):
            return 0.0
        return self.__dict__.get("learned_wait", 0.0)

    def learn(self: Any, value: float) -> None:
        self.__dict__["learned_wait"] = value

    Optimizer.wait = property(learned_or_none, learn)


class ShedRequests(logging.Filter):
    """BentoML logs each request its batcher sheds (its `fallback` raises ServiceUnavailable "process is
    overloaded" from the CancelledError of the dropped queue entry) as ~20 lines of traceback: thousands a
    minute under overload, drowning everything else. Each becomes one line, and is counted."""

    def __init__(self, retry_after: str, counter: Any) -> None:
        super().__init__()
        self.retry_after, self.counter = retry_after, counter

    def filter(self, record: logging.LogRecord) -> bool:
        from bentoml.exceptions import ServiceUnavailable

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ServiceUnavailable):
            self.counter.inc()
            record.msg = "shed a request (%s %s): %s; answered 503, Retry-After %s s"
            record.args = (*(record.args or ("?", "?"))[:2][::-1], error, self.retry_after)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def length_groups(texts: Sequence[str], size: int) -> list[list[int]]:
    """The indices of `texts` sorted by length, in groups of at most `size` (0: one group, in order): one model call
    each. A call pads every text to its longest, and on a CPU a text costs about the same per token at batch 1 as at
    batch 32: a batch of 32 short texts padded to its longest did twice the work of its texts, and batching itself
    saved nothing (docs/results.md, issue 27). Characters stand in for tokens (no second tokenization)."""
    if size == 0 or len(texts) <= size:
        return [list(range(len(texts)))]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[start:start + size] for start in range(0, len(order), size)]

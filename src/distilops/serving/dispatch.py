"""How requests reach the model. CallThreads: continuous dispatch, the default (call threads take what waits the
moment they are free). For BentoML's adaptive batching (DISTILOPS_DISPATCH=adaptive, its CorkDispatcher), a
correction: a lone request is not held for a wait learned under load. Either way a shed request is one log line,
not a traceback, and texts go to the model in calls of like length. Kept apart from service.py so they can be
tested without a server (tests/test_dispatch.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    """BentoML logs each request shed (its batcher's `fallback`, or CallThreads, raises ServiceUnavailable
    "process is overloaded") as ~20 lines of traceback: thousands a minute under overload, drowning everything
    else. Each becomes one line, and is counted."""

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


def in_text_order(groups: Sequence[Sequence[int]], answered: Iterable[Sequence[Any]]) -> list[Any]:
    """Each group's answers (one per index, in the group's order) put back at their texts' places."""
    answers: list[Any] = [None] * sum(len(group) for group in groups)
    for group, answer in zip(groups, answered, strict=True):
        for i, one in zip(group, answer, strict=True):
            answers[i] = one
    return answers


@dataclass
class Request:
    """What the call threads know of a request: queued when, and whether a chunk of it ran or it was shed."""

    since: float  # time.monotonic() when queued
    started: bool = False
    shed: bool = False


@dataclass
class Chunk:
    """Texts of one request (at most a call's worth, like in length), waiting for a call thread."""

    texts: list[str]
    future: asyncio.Future  # on the request's event loop
    request: Request


class CallThreads:
    """Continuous dispatch, instead of BentoML's adaptive batching: requests are cut into chunks (length_groups)
    that wait in one queue, and each of `threads` call threads takes the waiting chunks, up to `texts_per_call`
    texts (0: up to `max_texts`), the moment its last call ends. So a lone request goes to the model at once, and
    under load no thread idles while the event loop answers one batch and gathers the next: BentoML dispatches
    one batch at a time, and its call threads waited ~30% of the time (issue 27's profile). `run(texts, alone)` is
    the model call; `alone` is True when no other call runs and none waits (it may use every CPU thread).

    Load shedding, after BentoML's budget: a request arriving while the oldest waiting chunk has waited longer
    than `budget_s`, or one none of whose chunks has started within `budget_s`, gets `shed()` raised, and its
    chunks are dropped. Once a chunk of a request has run, the rest run too (a large request is not shed for
    its own length). A chunk whose request was cancelled (client gone) is dropped unrun."""

    def __init__(self, run: Callable[[list[str], bool], list[Any]], *, threads: int, texts_per_call: int,
                 max_texts: int, budget_s: float, shed: Callable[[], BaseException]) -> None:
        self.run, self.budget_s, self.shed = run, budget_s, shed
        self.limit = texts_per_call or max_texts
        self.texts_per_call = texts_per_call
        self.pending: deque[Chunk] = deque()
        self.ready = threading.Condition()
        self.busy, self.stopping = 0, False
        self.threads = [threading.Thread(target=self.serve, name=f"distilops-call-{i}", daemon=True)
                        for i in range(threads)]
        for thread in self.threads:
            thread.start()

    async def classify(self, texts: Sequence[str]) -> list[Any]:
        """The answers to `texts`, in order, once the call threads have run every chunk of them."""
        loop = asyncio.get_running_loop()
        groups = length_groups(texts, self.texts_per_call)
        request = Request(time.monotonic())
        chunks = [Chunk([texts[i] for i in group], loop.create_future(), request) for group in groups]
        with self.ready:
            if self.pending and request.since - self.pending[0].request.since > self.budget_s:
                raise self.shed()  # the queue is a budget behind: answer 503 now, not after waiting
            self.pending.extend(chunks)
            self.ready.notify(len(chunks))
        return in_text_order(groups, await asyncio.gather(*(chunk.future for chunk in chunks)))

    def serve(self) -> None:
        """One call thread: take what waits, run it, answer it; until stop()."""
        while True:
            with self.ready:
                while not self.pending and not self.stopping:
                    self.ready.wait()
                if not self.pending:
                    return
                taken = [self.pending.popleft()]
                texts = len(taken[0].texts)
                while self.pending and texts + len(self.pending[0].texts) <= self.limit:
                    taken.append(self.pending.popleft())
                    texts += len(taken[-1].texts)
                alone = self.busy == 0 and not self.pending
                self.busy += 1
                run = self.runnable(taken)
            try:
                if run:
                    self.answer(run, alone)
            finally:
                with self.ready:
                    self.busy -= 1

    def runnable(self, taken: list[Chunk]) -> list[Chunk]:
        """The taken chunks to run; the others shed or dropped (under self.ready)."""
        now, run = time.monotonic(), []
        for chunk in taken:
            request = chunk.request
            if request.shed or chunk.future.cancelled():
                continue
            if not request.started and now - request.since > self.budget_s:
                request.shed = True
                settle(chunk.future, error=self.shed())
                continue
            request.started = True
            run.append(chunk)
        return run

    def answer(self, run: list[Chunk], alone: bool) -> None:
        try:
            answers = self.run([text for chunk in run for text in chunk.texts], alone)
        except Exception as exc:  # noqa: BLE001 (the request gets the model's error)
            for chunk in run:
                settle(chunk.future, error=exc)
            return
        start = 0
        for chunk in run:
            settle(chunk.future, answers[start:start + len(chunk.texts)])
            start += len(chunk.texts)

    def stop(self) -> None:
        """Finish what waits, then end the threads (a process exiting during an ONNX Runtime call aborts)."""
        with self.ready:
            self.stopping = True
            self.ready.notify_all()
        for thread in self.threads:
            thread.join()


def settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a request's chunk result from a call thread, on its event loop; one cancelled meanwhile is left be."""
    def set_it() -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits for the answer
        future.get_loop().call_soon_threadsafe(set_it)

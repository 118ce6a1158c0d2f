"""BentoML's batcher itself (its CorkDispatcher, in this process, no server): once it has learned a wait, a lone
request is held that long, and the wait sustains itself; with serving/dispatch.py's correction a lone request goes
at once, while under load the learned wait still applies. And a shed request's log record becomes one line."""

import asyncio
import logging
import statistics
import time

import pytest
from bentoml._internal.marshal.dispatcher import CorkDispatcher, Optimizer
from bentoml.exceptions import ServiceUnavailable

from distilops.serving.dispatch import LIGHT_BATCHES, ShedRequests, length_groups, wait_only_under_load

LEARNED_WAIT = 0.04  # what BentoML learns under load for a ~2 ms model (issue 27: a lone request ~40 ms)
MODEL_SECONDS = 0.002


@pytest.fixture
def corrected():
    wait_only_under_load()
    yield
    del Optimizer.wait  # back to BentoML's own instance attribute


def lone_waits(requests: int = 12) -> list[float]:
    """Seconds each of `requests` lone requests (one at a time) waited before its model call, after the batcher
    finished its own training calls and was left with LEARNED_WAIT."""
    dispatched: list[float] = []

    async def model(batch):
        dispatched.append(time.perf_counter())
        await asyncio.sleep(MODEL_SECONDS)
        return list(batch)

    async def run() -> list[float]:
        dispatcher = CorkDispatcher(1000, 64, fallback=lambda: None, get_batch_size=lambda _: 1)
        call = dispatcher(model)
        for i in range(12):  # the batcher's warm-up and training calls
            await call(i)
        dispatcher.optimizer.wait = LEARNED_WAIT  # as learned under load
        waits = []
        for i in range(requests):
            sent = time.perf_counter()
            await call(i)
            waits.append(dispatched[-1] - sent)
        dispatcher.shutdown()
        return waits

    return asyncio.run(run())


def test_bentomls_batcher_holds_a_lone_request_for_its_learned_wait():
    assert statistics.median(lone_waits()) > 0.5 * LEARNED_WAIT


def test_corrected_a_lone_request_goes_at_once_after_a_few_calls(corrected):
    waits = lone_waits()
    assert statistics.median(waits[LIGHT_BATCHES:]) < 0.25 * LEARNED_WAIT, waits


def test_corrected_the_learned_wait_still_applies_under_load(corrected):
    optimizer = Optimizer(1.0)
    optimizer.wait = LEARNED_WAIT
    optimizer.o_stat.extend([(1, MODEL_SECONDS, 0.0)] * LIGHT_BATCHES)
    assert optimizer.wait == 0.0  # light: every recent call carried one request
    optimizer.o_stat.append((5, MODEL_SECONDS, 0.03))
    assert optimizer.wait == LEARNED_WAIT  # under load: BentoML's own batching


class Count:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


def test_a_shed_request_is_one_line_and_counted_other_errors_keep_their_traceback(caplog):
    logger = logging.getLogger("test-shed")
    counter = Count()
    logger.addFilter(ShedRequests("1", counter))
    try:
        with caplog.at_level(logging.ERROR, logger="test-shed"):
            for error in (ServiceUnavailable("process is overloaded"), RuntimeError("a real bug")):
                try:
                    raise error
                except Exception:
                    logger.exception("Exception on %s [%s]", "/classify", "POST")
    finally:
        logger.filters.clear()
    shed, bug = caplog.records
    assert shed.getMessage() == ("shed a request (POST /classify): process is overloaded; answered 503, "
                                 "Retry-After 1 s") and shed.exc_info is None
    assert bug.exc_info is not None and "Traceback" in caplog.text and counter.value == 1


def test_a_batch_is_cut_into_calls_of_like_length_each_text_once():
    texts = ["x" * n for n in (50, 3, 20, 3, 7, 90, 1, 12, 40)]
    groups = length_groups(texts, 4)
    assert [len(group) for group in groups] == [4, 4, 1]
    order = [i for group in groups for i in group]
    assert sorted(order) == list(range(len(texts)))  # every text in exactly one call
    assert [len(texts[i]) for i in order] == sorted(len(t) for t in texts)  # shortest first, across calls
    assert length_groups(texts, 0) == [list(range(len(texts)))]  # 0: the whole batch in one call, in order
    assert length_groups(texts[:4], 4) == [[0, 1, 2, 3]]  # a batch that fits one call is left as it is

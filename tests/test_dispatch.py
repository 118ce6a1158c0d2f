"""BentoML's batcher itself (its CorkDispatcher, in this process, no server): once it has learned a wait, a lone
request is held that long, and the wait sustains itself; with serving/dispatch.py's correction a lone request goes
at once, while under load the learned wait still applies. And a shed request's log record becomes one line.
Continuous dispatch (CallThreads) with a fake model: answers on their own texts, no thread idle while work waits,
shedding over the budget, cancelled requests never run."""

import asyncio
import logging
import statistics
import threading
import time

import pytest
from bentoml._internal.marshal.dispatcher import CorkDispatcher, Optimizer
from bentoml.exceptions import ServiceUnavailable

from distilops.serving.dispatch import LIGHT_BATCHES, CallThreads, ShedRequests, length_groups, wait_only_under_load

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


class FakeModel:
    """Answers each text with itself upper-cased after `seconds` (and, given a `gate`, once it is set); records
    every call (texts, alone, start, end)."""

    def __init__(self, seconds: float = 0.0, fail_on: str | None = None, gate: threading.Event | None = None) -> None:
        self.seconds, self.fail_on, self.gate, self.calls = seconds, fail_on, gate, []
        self.lock = threading.Lock()

    def __call__(self, texts: list[str], alone: bool) -> list[str]:
        if self.gate is not None:
            self.gate.wait(5)
        start = time.monotonic()
        time.sleep(self.seconds)
        with self.lock:
            self.calls.append((list(texts), alone, start, time.monotonic()))
        if self.fail_on in texts:
            raise RuntimeError(f"model failed on {self.fail_on}")
        return [text.upper() for text in texts]


def call_threads(model: FakeModel, **settings) -> CallThreads:
    defaults = {"threads": 2, "texts_per_call": 4, "max_texts": 64, "budget_s": 5.0,
                "shed": lambda: ServiceUnavailable("process is overloaded")}
    return CallThreads(model, **{**defaults, **settings})


def test_continuous_answers_land_on_their_own_texts_each_run_once_in_calls_of_at_most_the_limit():
    model = FakeModel(0.001)
    threads = call_threads(model)
    requests = [[f"r{r}t{t}" + "x" * ((r * 7 + t * 3) % 11) for t in range(1 + r % 6)] for r in range(40)]

    async def send() -> list[list[str]]:
        return await asyncio.gather(*(threads.classify(texts) for texts in requests))

    try:
        answered = asyncio.run(send())
    finally:
        threads.stop()
    assert answered == [[text.upper() for text in texts] for texts in requests]
    ran = [text for texts, _, _, _ in model.calls for text in texts]
    assert sorted(ran) == sorted(text for texts in requests for text in texts)  # each text exactly once
    assert max(len(texts) for texts, _, _, _ in model.calls) <= 4
    assert any(len({text.split("t")[0] for text in texts}) > 1 for texts, _, _, _ in model.calls), \
        "no call took texts of several requests"


def test_continuous_a_lone_request_goes_at_once_on_every_thread_and_under_load_no_thread_idles():
    model = FakeModel(0.02)
    threads = call_threads(model, texts_per_call=1)

    async def send() -> list[float]:
        waits = []
        for i in range(6):
            sent = time.monotonic()
            await threads.classify([f"lone{i}"])
            waits.append(model.calls[-1][2] - sent)
        await asyncio.gather(*(threads.classify([f"t{i}"]) for i in range(12)))
        return waits

    try:
        waits = asyncio.run(send())
    finally:
        threads.stop()
    lone, loaded = model.calls[:6], model.calls[6:]
    assert statistics.median(waits) < 0.25 * LEARNED_WAIT, waits  # no wait before its call
    assert all(alone for _, alone, _, _ in lone)  # nothing else ran or waited: every CPU thread for it
    assert not any(alone for _, alone, _, _ in loaded[:-1])  # calls side by side share the threads
    # While texts waited, both threads ran calls: every call but the last overlaps another one.
    overlapping = [a for a in loaded if any(b is not a and b[2] < a[3] and a[2] < b[3] for b in loaded)]
    assert len(overlapping) >= len(loaded) - 1, loaded


def test_continuous_sheds_over_the_budget_and_a_model_error_reaches_only_its_call():
    gate = threading.Event()
    model = FakeModel(fail_on="bad", gate=gate)
    threads = call_threads(model, threads=1, texts_per_call=1, budget_s=0.05)

    async def send() -> tuple:
        first = asyncio.ensure_future(threads.classify(["first"]))  # taken at once, then blocked in the model
        await asyncio.sleep(0.02)
        waiting = asyncio.ensure_future(threads.classify(["waiting"]))  # waits past the budget: shed when taken
        await asyncio.sleep(0.1)
        with pytest.raises(ServiceUnavailable):  # the queue is a budget behind: shed at once, not once taken
            await asyncio.wait_for(threads.classify(["late"]), 2)
        gate.set()
        results = await asyncio.gather(first, waiting, return_exceptions=True)
        bad = await asyncio.gather(threads.classify(["bad"]), threads.classify(["good"]), return_exceptions=True)
        return results, bad

    try:
        (first, waiting), (bad, good) = asyncio.run(send())
    finally:
        threads.stop()
    assert first == ["FIRST"] and isinstance(waiting, ServiceUnavailable)
    assert isinstance(bad, RuntimeError) and good == ["GOOD"]
    assert [texts for texts, *_ in model.calls] == [["first"], ["bad"], ["good"]]  # shed ones never ran


def test_continuous_a_cancelled_request_is_not_run_and_stop_finishes_what_waits():
    gate = threading.Event()
    model = FakeModel(gate=gate)
    threads = call_threads(model, threads=1, texts_per_call=1)

    async def send() -> list:
        first = asyncio.ensure_future(threads.classify(["first"]))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(threads.classify(["client gone"]))
        kept = asyncio.ensure_future(threads.classify(["kept"]))
        await asyncio.sleep(0.02)
        gone.cancel()
        gate.set()
        return await asyncio.gather(first, kept)

    assert asyncio.run(send()) == [["FIRST"], ["KEPT"]]
    threads.stop()
    assert [texts for texts, *_ in model.calls] == [["first"], ["kept"]]
    assert not any(thread.is_alive() for thread in threads.threads)


def test_continuous_a_started_request_is_not_shed_for_its_own_length():
    """Six texts of 20 ms each on one thread take ~120 ms, past a 50 ms budget: once its first call ran, the rest
    run too, and the request is answered."""
    model = FakeModel(0.02)
    threads = call_threads(model, threads=1, texts_per_call=1, budget_s=0.05)
    texts = [f"t{i}" for i in range(6)]
    try:
        assert asyncio.run(threads.classify(texts)) == [text.upper() for text in texts]
    finally:
        threads.stop()
    assert len(model.calls) == 6

"""The numbers of live fidelity (serving/fidelity.py): PSI, the bins, the reference description, and the rolling
windows the service computes drift and live agreement over."""

import contextlib
import math
import threading
import time
import types

import numpy as np
import pytest

from distilops.serving.fidelity import (
    CONFIDENCE_EDGES,
    FEATURES,
    MIN_DRIFT_TEXTS,
    PSI_FLOOR,
    WINDOWS_EDGES,
    WORDS_EDGES,
    LiveDrift,
    RollingCounts,
    bin_index,
    bin_indices,
    fractions,
    label_fractions,
    psi,
    reference,
    word_count,
)

LABELS = ("rotten", "fresh")


def test_psi_by_hand():
    # (0.25 - 0.5) * ln(0.25 / 0.5) + (0.75 - 0.5) * ln(0.75 / 0.5) = 0.25 ln 2 + 0.25 ln 1.5 = 0.25 ln 3 = 0.2747
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * math.log(3))
    assert psi([0.25, 0.75], [0.5, 0.5]) == pytest.approx(psi([0.5, 0.5], [0.25, 0.75]))  # symmetric
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0


def test_psi_floors_empty_bins():
    # Both bins empty on one side: each counts as 1e-4, so (1 - 1e-4) * ln(1e4) per bin, twice; finite.
    assert psi([1.0, 0.0], [0.0, 1.0]) == pytest.approx(2 * (1 - PSI_FLOOR) * math.log(1 / PSI_FLOOR))
    # An empty bin on both sides adds nothing.
    assert psi([0.5, 0.5, 0.0], [0.25, 0.75, 0.0]) == pytest.approx(0.25 * math.log(3))
    assert psi([1.0, 0.0], [0.0, 1.0], floor=0.01) == pytest.approx(2 * 0.99 * math.log(100))
    with pytest.raises(ValueError, match="2 expected bins vs 3 observed"):
        psi([0.5, 0.5], [0.2, 0.3, 0.5])


def test_a_value_on_an_edge_falls_in_the_bin_it_closes():
    assert [bin_index(v, CONFIDENCE_EDGES) for v in (0.5, 0.6, 0.6001, 0.99, 0.995, 1.0)] == [0, 0, 1, 5, 6, 6]
    assert [bin_index(v, WORDS_EDGES) for v in (0, 5, 6, 640, 641)] == [0, 0, 1, 7, 8]
    assert [bin_index(v, WINDOWS_EDGES) for v in (1, 2, 3, 16, 17)] == [0, 1, 2, 4, 5]
    values = [0.0, 0.6, 0.65, 0.7, 0.95, 0.99, 1.0, *np.linspace(0.5, 1, 51)]
    assert bin_indices(values, CONFIDENCE_EDGES).tolist() == [bin_index(v, CONFIDENCE_EDGES) for v in values]
    assert bin_indices([], WORDS_EDGES).tolist() == []


def test_fractions_and_label_fractions():
    assert fractions([1, 5, 6, 700], WORDS_EDGES) == [0.5, 0.25, 0, 0, 0, 0, 0, 0, 0.25]
    assert fractions([], WINDOWS_EDGES) == [0.0] * (len(WINDOWS_EDGES) + 1)  # no texts: no division by zero
    assert label_fractions(["fresh", "fresh", "rotten", "fresh"], LABELS) == [0.25, 0.75]  # the model's order
    assert label_fractions([], LABELS) == [0.0, 0.0]
    assert word_count("  a  moving\tfilm\n") == 3


def make_reference(predicted=("fresh", "fresh", "rotten", "fresh"), confidence=(0.55, 0.97, 0.8, 0.99),
                   words=(3, 12, 50, 300), windows=(1, 1, 2, 5)) -> dict:
    return reference(predicted=list(predicted), confidence=list(confidence), words=list(words), windows=list(windows),
                     labels=LABELS, agreement=0.9, agreement_ci=(0.85, 0.94), split="test")


def test_the_reference_describes_each_feature_with_its_bins():
    described = make_reference()
    assert described["split"] == "test" and described["texts"] == 4
    assert described["agreement_with_teacher"] == 0.9 and described["agreement_with_teacher_ci"] == [0.85, 0.94]
    assert described["label"] == {"labels": list(LABELS), "fractions": [0.25, 0.75]}
    assert described["confidence"] == {"edges": list(CONFIDENCE_EDGES), "fractions": [0.25, 0, 0.25, 0, 0, 0.5, 0]}
    assert described["words"]["edges"] == list(WORDS_EDGES)
    assert described["words"]["fractions"] == [0.25, 0, 0.25, 0, 0.25, 0, 0.25, 0, 0]
    assert described["windows"]["fractions"] == [0.5, 0.25, 0, 0.25, 0, 0]
    assert set(FEATURES) <= set(described)


def test_rolling_counts_keep_the_last_items_only():
    window = RollingCounts(bins=3, size=4)
    assert window.filled == 0 and window.fractions() == [0, 0, 0]
    window.add([0, 1])
    assert window.filled == 2 and window.counts.tolist() == [1, 1, 0]
    window.add([2, 2, 2])  # 0 falls out: the window holds 1, 2, 2, 2
    assert window.filled == 4 and window.counts.tolist() == [0, 1, 3] and window.fractions() == [0, 0.25, 0.75]
    window.add([0] * 6)  # longer than the window: only its last 4 stay
    assert window.counts.tolist() == [4, 0, 0]
    window.add([1])
    assert window.counts.tolist() == [3, 1, 0]


def test_rolling_counts_match_a_recount_whatever_the_batch_sizes():
    rng = np.random.default_rng(0)
    window, everything = RollingCounts(bins=5, size=37), []
    for size in rng.integers(0, 60, 40):
        batch = rng.integers(0, 5, size).tolist()
        window.add(batch)
        everything += batch
        assert window.counts.tolist() == np.bincount(everything[-37:], minlength=5).tolist()
    with pytest.raises(ValueError, match="size >= 1"):
        RollingCounts(bins=2, size=0)


def test_live_drift_waits_for_enough_texts_then_gives_psi_per_feature():
    ref = make_reference()
    drift = LiveDrift(ref, LABELS, size=8)
    assert drift.min_texts == 8  # min(window, MIN_DRIFT_TEXTS)
    drift.add(["fresh", "fresh", "rotten", "fresh"], [0.55, 0.97, 0.8, 0.99], [3, 12, 50, 300], [1, 1, 2, 5])
    assert drift.psi() is None  # 4 texts of the 8 needed
    drift.add(["fresh", "fresh", "rotten", "fresh"], [0.55, 0.97, 0.8, 0.99], [3, 12, 50, 300], [1, 1, 2, 5])
    assert drift.psi() == {feature: pytest.approx(0.0) for feature in FEATURES}  # the reference's own mix
    drift.add(["rotten"] * 8, [0.97] * 8, [3] * 8, [1] * 8)  # the window now holds only these
    shifted = drift.psi()
    assert shifted["label"] == pytest.approx(psi([0.25, 0.75], [1.0, 0.0]))
    assert shifted["words"] == pytest.approx(psi(ref["words"]["fractions"], [1, 0, 0, 0, 0, 0, 0, 0, 0]))
    assert LiveDrift(ref, LABELS, size=5000).min_texts == MIN_DRIFT_TEXTS


def test_live_drift_maps_labels_by_name_not_position():
    drift = LiveDrift(make_reference(), ("fresh", "rotten"), size=4)  # a model listing its labels the other way
    drift.add(["fresh", "fresh", "rotten", "fresh"], [0.9] * 4, [3] * 4, [1] * 4)
    assert drift.psi()["label"] == pytest.approx(0.0)


@pytest.mark.parametrize("change,message", [
    (lambda r: r["label"].update(labels=["neg", "pos"]), r"labels \['neg', 'pos'\] are not the model's"),
    (lambda r: r["words"].update(edges=[5, 10]), r"words bins \[5, 10\] are not this service's"),
    (lambda r: r.pop("windows"), "lacks 'windows'"),
    (lambda r: r["confidence"].update(fractions=[1.0]), "fractions per feature"),
])
def test_a_reference_that_does_not_fit_is_refused_with_the_reason(change, message):
    ref = make_reference()
    change(ref)
    with pytest.raises(ValueError, match=message):
        LiveDrift(ref, LABELS, size=10)


def test_the_service_records_a_batch_as_one_observation_at_a_time_would():
    """The service adds a batch to its histograms one increment per bucket (Metrics.observe); Prometheus must read
    the same buckets, count and sum as observing each text, values on an edge included."""
    from prometheus_client import Histogram

    from distilops.serving.live import Metrics

    metrics = Metrics("7", LABELS)
    assert metrics.batched
    batch = {"confidence": [0.5, 0.6, 0.61, 0.99, 1.0], "words": [1, 5, 6, 640, 700], "windows": [1, 2, 3, 16, 17]}
    metrics.observe(["fresh"] * 5, batch["confidence"], batch["words"], batch["windows"])
    metrics.observe(["rotten"], [0.7], [10], [1])

    def samples(histogram) -> list[tuple]:
        return [(s.name.rsplit("_", 1)[1], s.labels.get("le"), s.value) for family in histogram.collect()
                for s in family.samples if not s.name.endswith("_created")]

    for (child, edges), values, last in zip(metrics.histograms, batch.values(), (0.7, 10, 1), strict=True):
        one_at_a_time = Histogram("reference", "", buckets=edges, registry=None)
        for value in [*values, last]:
            one_at_a_time.observe(value)
        assert samples(child) == samples(one_at_a_time)
    counted = {label: [s.value for family in child.collect() for s in family.samples if s.name.endswith("_total")]
               for label, child in metrics.predictions.items()}
    assert counted == {"fresh": [5.0], "rotten": [1.0]}


class Timeline:
    """A stand-in for a model (`classify` sleeps `seconds`) that records when each of its calls ran."""

    def __init__(self, name: str, seconds: float, calls: list) -> None:
        self.name, self.seconds, self.calls = name, seconds, calls
        self.labels = list(LABELS)

    def classify(self, texts):  # noqa: ANN001, ANN201
        start = time.monotonic()
        time.sleep(self.seconds)
        self.calls.append((self.name, start, time.monotonic()))
        return [types.SimpleNamespace(label=LABELS[0]) for _ in texts]


def overlapping(calls: list, a: str, b: str) -> list:
    return [(x, y) for x in calls if x[0] == a for y in calls if y[0] == b and x[1] < y[2] and y[1] < x[2]]


def test_a_serial_shadow_never_runs_during_a_model_call_and_still_gets_turns_under_load():
    """Two request threads keep the model busy without a gap (their calls overlap each other) while the shadow
    scores every text offered: no shadow call overlaps a model call, the shadow scores in batches of at most
    `batch`, and it still gets turns (after its max wait, before the next model call). Without Turns (the design
    before) the same load overlaps them."""
    from distilops.serving.live import Metrics, Shadow, Turns

    def run(turns: Turns | None) -> tuple[list, Shadow]:
        calls: list = []
        model, teacher = Timeline("model", 0.02, calls), Timeline("shadow", 0.01, calls)
        shadow = Shadow(teacher, Metrics("7", LABELS), rate=1.0, queue_size=1000, window=100, batch=3,
                        turns=turns)
        end = time.monotonic() + 1.0

        def requests() -> None:
            while time.monotonic() < end:
                with turns.model() if turns else contextlib.nullcontext():
                    answers = model.classify(["a text"] * 2)
                shadow.offer(["a text"] * 2, [a.label for a in answers])

        threads = [threading.Thread(target=requests) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        shadow.stop()
        return calls, shadow

    calls, shadow = run(Turns(max_wait_s=0.05))
    models, shadows = [c for c in calls if c[0] == "model"], [c for c in calls if c[0] == "shadow"]
    assert len(models) > 20 and len(shadows) >= 5, (len(models), len(shadows))
    assert not overlapping(calls, "model", "shadow")
    assert len(overlapping(calls, "model", "model")) > 0  # model calls still overlap each other
    assert shadow.metrics.compared._value.get() <= 3 * len(shadows)  # batches of 3 at most

    calls, _ = run(None)
    assert overlapping(calls, "model", "shadow")  # the same load without turns: the shadow runs alongside


def test_turns_let_the_shadow_go_at_once_while_the_model_is_idle_and_hold_new_model_calls_meanwhile():
    from distilops.serving.live import Turns

    turns, events = Turns(max_wait_s=10), []
    start = time.monotonic()
    with turns.shadow():
        assert time.monotonic() - start < 1  # idle model: no wait for the 10 s
        def call() -> None:
            with turns.model():
                events.append(time.monotonic())

        model = threading.Thread(target=call)
        model.start()
        time.sleep(0.1)
        assert not events  # a model call waits for the shadow's call to end
        ended = time.monotonic()
    model.join(5)
    assert events and events[0] >= ended

"""What a served model's predictions look like, as numbers both the evaluate stage and the live service compute.

The evaluate stage describes the served variant's predictions on the test split (`reference`: label mix,
confidence, text length and windows per text, and its agreement with the teacher with a 95% interval); the
register stage stores that description in the model folder's distilops.json, so it travels with the version
into the Bento and the image. The service compares the texts it answers against it (`psi`) and exports both.
One home for the bins, so the reference and the live histograms are cut the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Upper bounds of the bins (the last bin is open: above the last edge). Prometheus histograms use the same
# edges as their `le` buckets, so a PromQL query over the live histogram reads the reference's bins.
CONFIDENCE_EDGES = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # probability of the predicted label
WORDS_EDGES = (5, 10, 20, 40, 80, 160, 320, 640)  # whitespace-separated words per text
WINDOWS_EDGES = (1, 2, 4, 8, 16)  # windows of max_length tokens a text was read in
FEATURES = ("label", "confidence", "words", "windows")
PSI_FLOOR = 1e-4  # an empty bin counts as this fraction: PSI stays finite (the usual smoothing)


def bin_index(value: float, edges: Sequence[float]) -> int:
    """The bin of `value`: the first edge it does not exceed, or len(edges) above them all."""
    for i, edge in enumerate(edges):
        if value <= edge:
            return i
    return len(edges)


def fractions(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """The fraction of `values` in each of the len(edges) + 1 bins."""
    counts = np.zeros(len(edges) + 1)
    for value in values:
        counts[bin_index(value, edges)] += 1
    return (counts / max(1, len(values))).tolist()


def label_fractions(predicted: Sequence[str], labels: Sequence[str]) -> list[float]:
    """The fraction of predictions per label, in the model's label order."""
    counts = np.array([sum(1 for p in predicted if p == label) for label in labels], dtype=float)
    return (counts / max(1, len(predicted))).tolist()


def psi(expected: Sequence[float], observed: Sequence[float], floor: float = PSI_FLOOR) -> float:
    """Population stability index: sum over bins of (observed - expected) * ln(observed / expected), each
    fraction floored at `floor`. 0 = the same mix; by convention < 0.1 stable, 0.1-0.25 a shift, > 0.25 a
    large one."""
    if len(expected) != len(observed):
        raise ValueError(f"psi: {len(expected)} expected bins vs {len(observed)} observed")
    total = 0.0
    for e, o in zip(expected, observed, strict=True):
        e, o = max(e, floor), max(o, floor)
        total += (o - e) * math.log(o / e)
    return total


def word_count(text: str) -> int:
    return len(text.split())


def reference(*, predicted: Sequence[str], confidence: Sequence[float], words: Sequence[int],
              windows: Sequence[int], labels: Sequence[str], agreement: float,
              agreement_ci: tuple[float, float], split: str) -> dict:
    """The description of a model's predictions on an evaluation split that the service compares against."""
    return {
        "split": split,
        "texts": len(predicted),
        "agreement_with_teacher": float(agreement),
        "agreement_with_teacher_ci": [float(agreement_ci[0]), float(agreement_ci[1])],
        "label": {"labels": list(labels), "fractions": label_fractions(predicted, labels)},
        "confidence": {"edges": list(CONFIDENCE_EDGES), "fractions": fractions(confidence, CONFIDENCE_EDGES)},
        "words": {"edges": list(WORDS_EDGES), "fractions": fractions(words, WORDS_EDGES)},
        "windows": {"edges": list(WINDOWS_EDGES), "fractions": fractions(windows, WINDOWS_EDGES)},
    }


# The live side: the service keeps the last N texts it answered binned like the reference, and the PSI of those.
MIN_DRIFT_TEXTS = 100  # a PSI over fewer texts is mostly sampling noise: the gauge waits for min(window, this)


def bin_indices(values: Sequence[float], edges: Sequence[float]) -> np.ndarray:
    """`bin_index` of every value at once: the first edge >= value is numpy's left-sided searchsorted."""
    return np.searchsorted(np.asarray(edges, dtype=float), np.asarray(values, dtype=float), side="left")


class RollingCounts:
    """How many of the last `size` items fell in each of `bins` bins: a ring of bin indices and their counts, so
    adding a batch costs a few numpy operations whatever the window's size (no per-item Python loop)."""

    def __init__(self, bins: int, size: int) -> None:
        if size < 1:
            raise ValueError(f"a rolling window needs size >= 1, got {size}")
        self.size = size
        self.ring = np.zeros(size, dtype=np.int64)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.seen = 0  # items ever added; ring positions below min(seen, size) hold real items

    @property
    def filled(self) -> int:
        return min(self.seen, self.size)

    def add(self, indices: Sequence[int] | np.ndarray) -> None:
        added = np.asarray(indices, dtype=np.int64)
        kept = added[-self.size:]  # a batch longer than the window: only its last `size` items stay
        start = (self.seen + len(added) - len(kept)) % self.size
        positions = (start + np.arange(len(kept))) % self.size  # distinct, as len(kept) <= size
        replaced = self.ring[positions[positions < self.filled]]
        self.counts -= np.bincount(replaced, minlength=len(self.counts))
        self.ring[positions] = kept
        self.counts += np.bincount(kept, minlength=len(self.counts))
        self.seen += len(added)

    def fractions(self) -> list[float]:
        return (self.counts / max(1, self.filled)).tolist()


class LiveDrift:
    """The last `size` texts a service answered, binned like `reference` (`reference()`'s dict), and the PSI of
    each feature against it. Raises ValueError when the reference does not fit this model or these bins."""

    def __init__(self, reference: dict, labels: Sequence[str], size: int) -> None:
        expected = check_reference(reference, labels)
        self.expected = expected
        self.label_bin = {label: reference["label"]["labels"].index(label) for label in labels}
        self.windows = {feature: RollingCounts(len(expected[feature]), size) for feature in FEATURES}
        self.min_texts = min(size, MIN_DRIFT_TEXTS)

    def add(self, labels: Sequence[str], confidence: Sequence[float], words: Sequence[int],
            windows: Sequence[int]) -> None:
        self.windows["label"].add([self.label_bin[label] for label in labels])
        self.windows["confidence"].add(bin_indices(confidence, CONFIDENCE_EDGES))
        self.windows["words"].add(bin_indices(words, WORDS_EDGES))
        self.windows["windows"].add(bin_indices(windows, WINDOWS_EDGES))

    def psi(self) -> dict[str, float] | None:
        """PSI per feature of the texts in the window against the reference; None until it holds `min_texts`."""
        if self.windows["label"].filled < self.min_texts:
            return None
        return {f: psi(self.expected[f], self.windows[f].fractions()) for f in FEATURES}


def check_reference(reference: dict, labels: Sequence[str]) -> dict[str, list[float]]:
    """The reference's fractions per feature, once it is known to fit `labels` and this module's bins."""
    edges = {"confidence": CONFIDENCE_EDGES, "words": WORDS_EDGES, "windows": WINDOWS_EDGES}
    try:
        expected = {feature: list(reference[feature]["fractions"]) for feature in FEATURES}
        recorded = {feature: list(reference[feature]["edges"]) for feature in edges}
        reference_labels = list(reference["label"]["labels"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"the reference lacks {exc}: not a fidelity.reference() description") from exc
    if sorted(reference_labels) != sorted(labels):
        raise ValueError(f"the reference's labels {reference_labels} are not the model's {list(labels)}")
    for feature, own in edges.items():
        if recorded[feature] != list(own):
            raise ValueError(f"the reference's {feature} bins {recorded[feature]} are not this service's {list(own)}: "
                             "evaluate the model again with this code")
    sizes = {"label": len(reference_labels), **{f: len(e) + 1 for f, e in edges.items()}}
    got = {f: len(expected[f]) for f in FEATURES}
    if got != sizes:
        raise ValueError(f"the reference's fractions per feature {got} do not fit its bins {sizes}")
    return expected

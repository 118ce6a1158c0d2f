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

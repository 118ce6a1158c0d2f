"""Uncertainty of the accuracy figures: bootstrap intervals and exact McNemar tests.

One test split of ~1,300 texts gives an accuracy one standard error wide of about a point, and two
teachers trained from different seeds differ by more than that, so every accuracy the pipeline
reports comes with a 95% interval, and comparisons of two models on the same texts are paired:
- `agreement`, `retention`: the point figures (share of texts given the teacher's label; accuracy as a share
  of the teacher's), defined here once for evaluation, tuning and the registry's gates.
- `accuracy_interval`: percentile bootstrap over the texts.
- `retention_interval`: student accuracy / teacher accuracy, both from the same resampled texts.
- `mcnemar`: the exact (binomial) McNemar test on the texts exactly one of two models gets right.
Per-text correctness travels with a registry version as a bit string (`pack_correct`), so
`promote` can test a candidate against production on the same texts.
"""

from __future__ import annotations

import base64
from fractions import Fraction
from math import comb

import numpy as np

LEVEL = 0.95


def agreement(predictions: np.ndarray, teacher: np.ndarray) -> float:
    """Share of texts on which a model's label is the teacher's (label ids, or labels, text by text)."""
    return float((np.asarray(predictions) == np.asarray(teacher)).mean())


def retention(accuracy: float, teacher_accuracy: float) -> float:
    """A model's accuracy as a share of its teacher's (NaN when the teacher got nothing right)."""
    return float(accuracy / teacher_accuracy) if teacher_accuracy else float("nan")


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] indices drawn with replacement; the same draw serves every model (paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def accuracy_interval(correct: np.ndarray, indices: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    return percentile_interval(np.asarray(correct, dtype=np.float64)[indices].mean(axis=1), level)


def retention_interval(student_correct: np.ndarray, teacher_correct: np.ndarray, indices: np.ndarray,
                       level: float = LEVEL) -> tuple[float, float]:
    """Interval of accuracy(student) / accuracy(teacher), resampling the same texts for both."""
    student = np.asarray(student_correct, dtype=np.float64)[indices].mean(axis=1)
    teacher = np.asarray(teacher_correct, dtype=np.float64)[indices].mean(axis=1)
    return percentile_interval(student / np.maximum(teacher, 1e-12), level)


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict:
    """Exact two-sided McNemar test of models a and b on the same texts.

    `a_only`: texts only a gets right; `b_only`: only b. Under "equally accurate" each discordant
    text is a fair coin, so p = P(a binomial(a_only + b_only, 1/2) is at least as uneven).
    """
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same texts: {a.shape} vs {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    tail = Fraction(sum(comb(n, i) for i in range(k + 1)), 2 ** n) if n else Fraction(1, 2)
    return {"a_only": a_only, "b_only": b_only, "p_value": float(min(Fraction(1), 2 * tail))}


def pack_correct(correct: np.ndarray) -> str:
    """Per-text correctness as base64 bits (1,274 texts -> 216 characters: fits a registry tag)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack_correct(packed: str, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8))
    if len(bits) < n or len(bits) - n >= 8:
        raise ValueError(f"packed correctness holds {len(bits)} bits, not {n} texts")
    return bits[:n].astype(bool)

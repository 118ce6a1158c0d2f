"""Intervals and paired tests by hand: the exact McNemar p-value, bootstrap intervals that cover and
narrow, a paired retention interval, and per-text correctness that survives a registry tag."""

import numpy as np
import pytest
from scipy.stats import binomtest

from distilops import stats


def test_mcnemar_exact_by_hand_and_against_scipy():
    a = np.array([1, 1, 1, 1, 1, 0, 0], dtype=bool)  # a alone right on 5 texts, b alone on 0
    b = np.array([0, 0, 0, 0, 0, 0, 0], dtype=bool)
    test = stats.mcnemar(a, b)
    assert (test["a_only"], test["b_only"]) == (5, 0)
    assert test["p_value"] == pytest.approx(2 / 2 ** 5)  # both tails of 5 fair coins all landing one way
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.random(300) < 0.8, rng.random(300) < 0.75
        got = stats.mcnemar(a, b)
        discordant = got["a_only"] + got["b_only"]
        assert got["p_value"] == pytest.approx(binomtest(got["a_only"], discordant, 0.5).pvalue, rel=1e-9)
    assert stats.mcnemar(a, a)["p_value"] == 1.0  # no discordant texts: no evidence either way
    with pytest.raises(ValueError, match="same texts"):
        stats.mcnemar(a, a[:10])


def test_bootstrap_interval_covers_the_accuracy_and_narrows_with_more_texts():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 2500):
        correct = rng.random(n) < 0.85
        low, high = stats.accuracy_interval(correct, stats.bootstrap_indices(n, 1000, seed=0))
        assert low < correct.mean() < high
        widths.append(high - low)
        # about 2 x 1.96 standard errors wide
        assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.85 * 0.15 / n), rel=0.2)
    assert widths[1] < widths[0] / 4


def test_retention_interval_is_paired():
    rng = np.random.default_rng(2)
    teacher = rng.random(1000) < 0.85
    indices = stats.bootstrap_indices(1000, 1000, seed=0)
    assert stats.retention_interval(teacher, teacher, indices) == (1.0, 1.0)  # same texts: no noise at all
    student = teacher.copy()
    student[np.flatnonzero(teacher)[:10]] = False  # 10 texts fewer right
    low, high = stats.retention_interval(student, teacher, indices)
    assert low < student.mean() / teacher.mean() <= high < 1.0  # paired: the drop is visible, not noise


def test_correctness_packs_into_a_short_tag_and_back():
    correct = np.random.default_rng(3).random(1274) < 0.83
    packed = stats.pack_correct(correct)
    assert len(packed) <= 216
    np.testing.assert_array_equal(stats.unpack_correct(packed, 1274), correct)
    with pytest.raises(ValueError, match="not 2000 texts"):
        stats.unpack_correct(packed, 2000)

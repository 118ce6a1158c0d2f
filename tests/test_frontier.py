"""The depth frontier on hand-made points: the Pareto set, the choice rule's limits, tolerance and ties, the
error when nothing qualifies, the rows the stage records and the plot."""

from __future__ import annotations

import pytest

from distilops.config import ChooseRule
from distilops.errors import TuningError
from distilops.pipeline.frontier import Point, choose, frontier_rows, pareto, plot_frontier

TEACHER_MS = 7.5
PARAMS = {"temperature": 3.1, "alpha": 0.81, "learning_rate": 1.2e-4}


def point(trial: int, layers: int, val: float, general: float, latency: float, **params: float) -> Point:
    return Point(trial=trial, student_layers=layers, params={**PARAMS, **params}, val_agreement=val,
                 general_agreement=general, latency_ms=latency, speedup=TEACHER_MS / latency, val_accuracy=val - 0.05)


POINTS = [
    point(0, 2, 0.800, 0.780, 1.5),  # 5.0x, fidelity 0.790
    point(1, 3, 0.850, 0.830, 2.5),  # 3.0x, 0.840
    point(2, 3, 0.840, 0.820, 2.5),  # dominated by 1: as fast, less faithful on both
    point(3, 4, 0.885, 0.863, 3.1),  # 2.42x, 0.874
    point(4, 5, 0.880, 0.874, 3.7),  # 2.03x, 0.877: the most faithful
    point(5, 5, 0.870, 0.860, 3.8),  # dominated by 4
]


def rule(**limits: float) -> ChooseRule:
    return ChooseRule(**{"min_speedup": 0.0, "tolerance": 0.0, **limits})


def trials(points: list[Point]) -> list[int]:
    return [p.trial for p in points]


def test_fidelity_is_the_mean_of_both_agreements():
    assert POINTS[3].fidelity == pytest.approx(0.874)


def test_pareto_drops_dominated_points_and_sorts_by_latency():
    assert trials(pareto(POINTS)) == [0, 1, 3, 4]
    assert trials(pareto(list(reversed(POINTS)))) == [0, 1, 3, 4]  # the order given does not matter


def test_pareto_keeps_ties_and_drops_a_point_worse_on_one_objective_only():
    twin = point(6, 5, 0.880, 0.874, 3.7)  # the same trade-off as trial 4: neither dominates the other
    slower = point(7, 4, 0.885, 0.863, 3.2)  # trial 3, only slower
    worse_general = point(8, 4, 0.885, 0.860, 3.1)  # trial 3, only less faithful on general text
    assert trials(pareto([*POINTS, twin, slower, worse_general])) == [0, 1, 3, 4, 6]
    assert trials(pareto([POINTS[0]])) == [0] and pareto([]) == []


def test_the_tolerance_picks_the_faster_of_two_nearly_equal_points():
    chosen, reason = choose(POINTS, rule(min_speedup=1.5, tolerance=0.005))
    assert chosen.trial == 3
    assert reason.startswith("trial 3: 4 layers (T 3.1, alpha 0.81, lr 1.2e-04), fidelity 0.874 (validation 0.885, "
                             "general text 0.863), 3.10 ms = 2.4x the teacher.")
    assert "Of 6 points, 6 meet min_speedup 1.5" in reason
    assert "the most faithful, trial 4 (5 layers, 0.877), is within tolerance 0.005 and 0.6 ms slower" in reason
    assert choose(POINTS, rule(min_speedup=1.5, tolerance=0.0))[0].trial == 4  # no tolerance: the most faithful
    assert choose(POINTS, rule(tolerance=0.1))[0].trial == 0  # 0.790 is within 0.1 of 0.877: the fastest


def test_a_point_exactly_at_the_tolerance_counts_as_within_it():
    a, b = point(0, 4, 0.87, 0.87, 3.0), point(1, 5, 0.875, 0.875, 4.0)  # 0.875 - 0.005 = 0.87: ulps apart
    assert choose([a, b], rule(tolerance=0.005))[0].trial == 0


def test_min_speedup_is_honoured():
    chosen, reason = choose(POINTS, rule(min_speedup=2.1))  # trial 4 is 2.03x the teacher: out
    assert chosen.trial == 3 and "Of 6 points, 4 meet min_speedup 2.1; it is the most faithful of them." in reason


def test_max_latency_ms_is_honoured():
    assert choose(POINTS, rule(max_latency_ms=3.0))[0].trial == 1
    assert choose(POINTS, rule(max_latency_ms=3.0, tolerance=0.06))[0].trial == 0


def test_min_agreement_is_a_limit_before_the_tolerance_applies():
    assert choose(POINTS, rule(min_agreement=0.85))[0].trial == 4
    # trial 3 is within the tolerance of trial 4 but below min_agreement: it is no candidate at all
    chosen, reason = choose(POINTS, rule(min_agreement=0.876, tolerance=0.01))
    assert chosen.trial == 4 and "Of 6 points, 1 meets min_agreement 0.876" in reason


def test_every_limit_at_once_and_no_limit_at_all():
    chosen, reason = choose(POINTS, rule(min_speedup=2, max_latency_ms=3.5, min_agreement=0.8))
    assert chosen.trial == 3 and "meet min_speedup 2 and max_latency_ms 3.5 and min_agreement 0.8" in reason
    assert "Of 6 points (no limits set); it is the most faithful" in choose(POINTS, rule())[1]


def test_ties_go_to_the_more_faithful_then_the_earlier_trial():
    twin = point(6, 5, 0.880, 0.874, 3.7)
    assert choose([twin, *POINTS], rule())[0].trial == 4  # identical points: the earlier trial
    fast_a, fast_b = point(0, 3, 0.86, 0.86, 2.0), point(1, 3, 0.87, 0.87, 2.0)  # equally fast
    chosen, reason = choose([fast_a, fast_b], rule(tolerance=0.05))
    assert chosen.trial == 1 and "most faithful of them and the fastest of the 2 within tolerance 0.05" in reason


def test_no_candidate_is_an_error_naming_each_limit_and_the_nearest_point():
    with pytest.raises(TuningError) as raised:
        choose(POINTS, rule(min_speedup=2.6, min_agreement=0.86))
    message = str(raised.value)
    assert message.startswith("no point of the depth frontier (6 complete trials) meets distill.choose "
                              "(min_speedup 2.6, min_agreement 0.86, tolerance 0):")
    assert "  min_speedup 2.6: met by 3 of 6 (best: trial 0, 2 layers, 5.00x the teacher)" in message
    assert "  min_agreement 0.86: met by 3 of 6 (best: trial 4, 5 layers, fidelity 0.877)" in message
    # trial 3 misses min_speedup by 7% (2.42x); trial 1 misses min_agreement by 2.3%: the nearer one
    assert "  nearest: trial 1 (3 layers): fidelity 0.840 < min_agreement 0.86" in message
    assert message.endswith("Relax distill.choose in params.yaml, or search other depths "
                            "(distill.search.student_layers).")
    assert len(message.splitlines()) == 5

    with pytest.raises(TuningError, match=r"max_latency_ms 1: met by 0 of 6 \(best: trial 0, 2 layers, 1.50 ms\)"):
        choose(POINTS, rule(max_latency_ms=1))
    with pytest.raises(TuningError, match="the depth frontier is empty"):
        choose([], rule())


def test_rows_flag_the_pareto_points_and_the_chosen_one():
    chosen, _ = choose(POINTS, rule(min_speedup=1.5, tolerance=0.005))
    rows = frontier_rows(list(reversed(POINTS)), chosen)
    assert [r["trial"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["pareto"] for r in rows] == [True, True, False, True, True, False]
    assert [r["chosen"] for r in rows] == [False, False, False, True, False, False]
    assert list(rows[3]) == ["trial", "student_layers", "latency_ms", "speedup", "val_agreement", "general_agreement",
                             "fidelity", "val_accuracy", "pareto", "chosen", "temperature", "alpha", "learning_rate"]
    assert rows[3]["fidelity"] == pytest.approx(0.874) and rows[3]["speedup"] == pytest.approx(TEACHER_MS / 3.1)


def drawn(ax) -> dict:
    """What one panel shows: every scatter's points, the step line, the labels, the vertical limit lines."""
    from matplotlib.collections import PathCollection

    scatters = [[tuple(xy) for xy in c.get_offsets().tolist()] for c in ax.collections if isinstance(c, PathCollection)]
    lines = [ln for ln in ax.get_lines()]
    return {"scatters": scatters, "labels": [t.get_text() for t in ax.texts],
            "step": [tuple(xy) for xy in lines[0].get_xydata().tolist()] if lines else [],
            "vlines": {ln.get_label(): ln.get_xdata()[0] for ln in lines[1:]}, "ylabel": ax.get_ylabel()}


def test_the_plot_shows_every_point_the_front_the_choice_and_the_rule(tmp_path):
    limits = rule(min_speedup=1.5, max_latency_ms=3.5, tolerance=0.005)
    chosen, _ = choose(POINTS, limits)
    figure = plot_frontier(POINTS, chosen, tmp_path / "plots" / "frontier.png", rule=limits)
    assert (tmp_path / "plots" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    front = pareto(POINTS)
    for ax, field in zip(figure.axes, ("val_agreement", "general_agreement"), strict=True):
        shown = drawn(ax)
        every, front_dots, ring = shown["scatters"]
        assert every == [(p.latency_ms, getattr(p, field)) for p in POINTS]
        assert front_dots == [(p.latency_ms, getattr(p, field)) for p in front]
        assert ring == [(chosen.latency_ms, getattr(chosen, field))]
        assert shown["step"] == front_dots and shown["labels"] == [f"{p.student_layers}L" for p in POINTS]
        assert shown["vlines"] == {"min_speedup 1.5": pytest.approx(TEACHER_MS / 1.5), "max_latency_ms 3.5": 3.5}
    assert [drawn(ax)["ylabel"] for ax in figure.axes] == ["validation agreement", "general-text agreement"]
    assert figure.axes[1].get_xlabel() == f"served batch-1 latency, ms (teacher {TEACHER_MS:.2f} ms)"
    assert figure._suptitle.get_text() == ("depth frontier: 6 trials, 4 on the front; chosen 4L (trial 3)\n"
                                           "rule: min_speedup 1.5, max_latency_ms 3.5, tolerance 0.005")

    only = [POINTS[3]]
    one = plot_frontier(only, only[0], tmp_path / "one.png")
    assert drawn(one.axes[0])["scatters"] == [[(3.1, 0.885)]] * 3 and drawn(one.axes[0])["vlines"] == {}
    assert one._suptitle.get_text().startswith("depth frontier: 1 trial, 1 on the front") and "distill.choose" in (
        one._suptitle.get_text())

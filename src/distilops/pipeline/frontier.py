"""The depth frontier: which student depth (with its T/alpha/lr) the distill stage keeps.

Each complete trial of the multi-objective study is a `Point`: its agreement with the teacher on the
validation texts and on held-apart general text, and the served variant's batch-1 latency at its depth.
`pareto` keeps the points no other point beats on all three; `choose` applies the `distill.choose` rule
(hard limits, then the fastest point within `tolerance` of the most faithful) and says why in words;
`frontier_rows`, `choice_report` and `plot_frontier` give what the stage records. Pure: numpy and matplotlib
only, so the rule is tested without torch or Optuna.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from distilops.config import ChooseRule
from distilops.errors import TuningError

# Fidelities are means of shares and speedups are ratios: a value printed as exactly on a limit may sit a few
# ulps off it. Limits and the tolerance are compared with this much slack, so "within 0.005" means what it says.
EPS = 1e-9


def fidelity(val_agreement: float, general_agreement: float) -> float:
    """Mean agreement with the teacher over validation and general text: the one number `choose` ranks by (and
    the distill stage's study plots show)."""
    return (val_agreement + general_agreement) / 2


@dataclass(frozen=True)
class Point:
    trial: int
    student_layers: int
    params: dict[str, float]  # temperature, alpha, learning_rate (and any loss weights searched)
    val_agreement: float  # share of validation texts where the student's label is the teacher's
    general_agreement: float  # the same on the held-apart general text
    latency_ms: float  # the served variant's batch-1 p50 at this depth
    speedup: float  # the teacher's latency / latency_ms (the median of paired per-round ratios, both ONNX Runtime)
    val_accuracy: float
    speedup_low: float | None = None  # the speedup's quartiles over the rounds: how firm it is (None: not kept)
    speedup_high: float | None = None

    @property
    def fidelity(self) -> float:
        return fidelity(self.val_agreement, self.general_agreement)


def dominates(a: Point, b: Point) -> bool:
    """`a` is at least as good as `b` on every objective and better on one."""
    at_least = (a.val_agreement >= b.val_agreement and a.general_agreement >= b.general_agreement
                and a.latency_ms <= b.latency_ms)
    better = (a.val_agreement > b.val_agreement or a.general_agreement > b.general_agreement
              or a.latency_ms < b.latency_ms)
    return at_least and better


def by_speed(p: Point) -> tuple[float, float, int]:
    """Fastest first; among equally fast, the more faithful, then the earlier trial (a stable order)."""
    return p.latency_ms, -p.fidelity, p.trial


def pareto(points: Sequence[Point]) -> list[Point]:
    """The points no other point dominates on (validation agreement, general agreement, latency), fastest first.

    Points equal on all three dominate neither each other: both stay (two trials that found the same
    trade-off are both on the frontier; `choose` breaks the tie by trial number)."""
    kept = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(kept, key=by_speed)


def misses(p: Point, rule: ChooseRule) -> list[str]:
    """Each limit `p` fails, with its value: empty when `p` is a candidate."""
    found = []
    if rule.min_speedup and p.speedup < rule.min_speedup - EPS:
        found.append(f"{p.speedup:.2f}x the teacher < min_speedup {rule.min_speedup:g}")
    if rule.max_latency_ms and p.latency_ms > rule.max_latency_ms + EPS:
        found.append(f"{p.latency_ms:.2f} ms > max_latency_ms {rule.max_latency_ms:g}")
    if rule.min_agreement and p.fidelity < rule.min_agreement - EPS:
        found.append(f"fidelity {p.fidelity:.3f} < min_agreement {rule.min_agreement:g}")
    return found


def shortfall(p: Point, rule: ChooseRule) -> float:
    """How far `p` is from meeting the rule: its worst miss as a fraction of that limit (0 = meets it)."""
    gaps = [0.0]
    if rule.min_speedup:
        gaps.append((rule.min_speedup - p.speedup) / rule.min_speedup)
    if rule.max_latency_ms:
        gaps.append((p.latency_ms - rule.max_latency_ms) / rule.max_latency_ms)
    if rule.min_agreement:
        gaps.append((rule.min_agreement - p.fidelity) / rule.min_agreement)
    return max(gaps)


def describe(p: Point) -> str:
    """'trial 3: 4 layers (T 3.1, alpha 0.81, lr 1.2e-04)': the point's depth and what it was trained with."""
    short = {"temperature": ("T", ".3g"), "alpha": ("alpha", ".2f"), "learning_rate": ("lr", ".1e")}
    known = [f"{short[k][0]} {format(p.params[k], short[k][1])}" for k in short if k in p.params]
    extra = [f"{k} {v:.3g}" for k, v in p.params.items() if k not in short and v]  # weights searched (0 = off)
    trained = f" ({', '.join(known + extra)})" if known or extra else ""
    return f"trial {p.trial}: {p.student_layers} layers{trained}"


def point_text(p: Point) -> str:
    """The point in one sentence, independent of any rule: depth, parameters, fidelity, latency and speedup."""
    return (f"{describe(p)}, fidelity {p.fidelity:.3f} (validation {p.val_agreement:.3f}, "
            f"general text {p.general_agreement:.3f}), {p.latency_ms:.2f} ms = {p.speedup:.1f}x the teacher"
            + (f" [{p.speedup_low:.1f}, {p.speedup_high:.1f}]." if p.speedup_low is not None else "."))


def no_candidate(points: Sequence[Point], rule: ChooseRule) -> TuningError:
    """The error when no point meets the rule: each limit with how many points meet it, and the nearest miss."""
    lines = [f"no point of the depth frontier ({len(points)} complete trials) meets distill.choose "
             f"({rule.text()}):"]
    checks = [("min_speedup", rule.min_speedup, lambda p: p.speedup >= rule.min_speedup - EPS,
               max(points, key=lambda p: p.speedup), lambda p: f"{p.speedup:.2f}x the teacher"),
              ("max_latency_ms", rule.max_latency_ms, lambda p: p.latency_ms <= rule.max_latency_ms + EPS,
               min(points, key=lambda p: p.latency_ms), lambda p: f"{p.latency_ms:.2f} ms"),
              ("min_agreement", rule.min_agreement, lambda p: p.fidelity >= rule.min_agreement - EPS,
               max(points, key=lambda p: p.fidelity), lambda p: f"fidelity {p.fidelity:.3f}")]
    for name, value, meets, best, shown in checks:
        if value:
            lines.append(f"  {name} {value:g}: met by {sum(map(meets, points))} of {len(points)} "
                         f"(best: trial {best.trial}, {best.student_layers} layers, {shown(best)})")
    nearest = min(points, key=lambda p: (shortfall(p, rule), p.trial))
    lines.append(f"  nearest: trial {nearest.trial} ({nearest.student_layers} layers): "
                 f"{'; '.join(misses(nearest, rule))}")
    lines.append("Relax distill.choose in params.yaml, or search other depths (distill.search.student_layers).")
    return TuningError("\n".join(lines))


def choose(points: Sequence[Point], rule: ChooseRule) -> tuple[Point, str]:
    """The point the rule picks, and why in a sentence or two for the stage log.

    Candidates meet every active limit; among them, those within `rule.tolerance` of the most faithful count
    as equally faithful, and the fastest of those wins (ties: the more faithful, then the earlier trial).
    Raises TuningError when there are no points or no candidates."""
    if not points:
        raise TuningError("no complete trial to choose a student depth from: the depth frontier is empty")
    candidates = [p for p in points if not misses(p, rule)]
    if not candidates:
        raise no_candidate(points, rule)
    best = max(candidates, key=lambda p: (p.fidelity, -p.latency_ms, -p.trial))
    near = [p for p in candidates if p.fidelity >= best.fidelity - rule.tolerance - EPS]
    chosen = min(near, key=by_speed)

    said = point_text(chosen)
    active = rule.limits()
    verb = "meets" if len(candidates) == 1 else "meet"
    met = (f"Of {len(points)} points, {len(candidates)} {verb} {' and '.join(active)}" if active
           else f"Of {len(points)} points (no limits set)")
    if best.trial == chosen.trial:
        others = len(near) - 1
        why = ("it is the most faithful of them" + (f" and the fastest of the {others + 1} within tolerance "
                                                    f"{rule.tolerance:g}" if others else "") + ".")
    else:
        why = (f"the most faithful, trial {best.trial} ({best.student_layers} layers, {best.fidelity:.3f}), is "
               f"within tolerance {rule.tolerance:g} and {best.latency_ms - chosen.latency_ms:.2g} ms slower, so "
               "the faster one wins.")
    return chosen, f"{said} {met}; {why}"


def frontier_rows(points: Sequence[Point], chosen: Point) -> list[dict]:
    """One flat dict per point, by trial (plots/distill/frontier.csv, metrics/distill.json's "frontier")."""
    on_front = {p.trial for p in pareto(points)}
    return [{"trial": p.trial, "student_layers": p.student_layers, "latency_ms": p.latency_ms, "speedup": p.speedup,
             "val_agreement": p.val_agreement, "general_agreement": p.general_agreement, "fidelity": p.fidelity,
             "val_accuracy": p.val_accuracy, "pareto": p.trial in on_front, "chosen": p.trial == chosen.trial,
             **({"speedup_low": p.speedup_low, "speedup_high": p.speedup_high} if p.speedup_low is not None else {}),
             **p.params}
            for p in sorted(points, key=lambda p: p.trial)]


def choice_report(chosen: Point, reason: str, rule: ChooseRule) -> dict:
    """metrics/distill.json's "choice" for a searched depth: the rule, why, and the chosen point's numbers (the
    register stage tags the versions from it)."""
    return {"searched": True, "rule": rule.model_dump(), "reason": reason, "point": point_text(chosen),
            "trial": chosen.trial,
            "student_layers": chosen.student_layers, "latency_ms": chosen.latency_ms, "speedup": chosen.speedup,
            "val_agreement": chosen.val_agreement, "general_agreement": chosen.general_agreement,
            "fidelity": chosen.fidelity}


def plot_frontier(points: Sequence[Point], chosen: Point, path: Path, *, rule: ChooseRule | None = None) -> Figure:
    """Two panels sharing latency as x: validation agreement and general-text agreement. Every point is labelled
    with its depth, the Pareto points are joined by a step line, the chosen one is ringed; the title says the
    rule (pass `rule`; without it the title names distill.choose only), dashed lines mark its latency limits.
    Returns the figure saved at `path`."""
    front = pareto(points)
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")  # no pyplot: no global figure state, no GUI backend
    axes = fig.subplots(2, 1, sharex=True)
    panels = [("val_agreement", "validation agreement"), ("general_agreement", "general-text agreement")]
    teacher_ms = chosen.latency_ms * chosen.speedup
    for ax, (field, label) in zip(axes, panels, strict=True):
        xs = np.array([p.latency_ms for p in points])
        ys = np.array([getattr(p, field) for p in points])
        ax.scatter(xs, ys, s=28, color="0.6", zorder=2, label="trial")
        ax.step([p.latency_ms for p in front], [getattr(p, field) for p in front], where="post", color="C0",
                zorder=3, label="Pareto front")
        ax.scatter([p.latency_ms for p in front], [getattr(p, field) for p in front], s=34, color="C0", zorder=4)
        for p in points:
            ax.annotate(f"{p.student_layers}L", (p.latency_ms, getattr(p, field)), textcoords="offset points",
                        xytext=(7, 6), fontsize=8)
        ax.scatter([chosen.latency_ms], [getattr(chosen, field)], s=220, facecolors="none", edgecolors="C3",
                   linewidths=2, zorder=5, label=f"chosen (trial {chosen.trial})")
        if rule is not None and rule.min_speedup:
            ax.axvline(teacher_ms / rule.min_speedup, color="C1", linestyle="--", linewidth=1,
                       label=f"min_speedup {rule.min_speedup:g}")
        if rule is not None and rule.max_latency_ms:
            ax.axvline(rule.max_latency_ms, color="C2", linestyle="--", linewidth=1,
                       label=f"max_latency_ms {rule.max_latency_ms:g}")
        ax.set_ylabel(label)
        ax.margins(x=0.15, y=0.15)  # room for the labels, and a visible span with a single point
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].set_xlabel(f"served batch-1 latency, ms (teacher {teacher_ms:.2f} ms)")
    shown = rule.text() if rule is not None else "distill.choose"
    trials = f"{len(points)} trial{'s' if len(points) > 1 else ''}"
    fig.suptitle(f"depth frontier: {trials}, {len(front)} on the front; chosen {chosen.student_layers}L "
                 f"(trial {chosen.trial})\nrule: {shown}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return fig  # what was drawn, for a caller (a test) to read back

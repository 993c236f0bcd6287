"""The INT8 choices as pure functions over measured numbers, so they are unit-tested on plain data.

Scores are validation metrics in the task's direction made "higher is better" (``score``); speed comes from a
callback so the caller decides how (and whether) to measure it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

AUTO_FLOAT_GAIN = 0.5  # a rung of FP32 leading convs is kept when at least this many points better on validation,
AUTO_FLOAT_SPEED = 1.03  # ... or at least as good and this much faster than the placement kept so far


def score(metric) -> float:
    """A ``tasks.base.Metric`` as a number where higher is better."""
    return metric.value if metric.higher_is_better else -metric.value


@dataclass(frozen=True)
class Variant:
    """One INT8 graph of a candidate: its placement tag ("" = as built; "w8", "fl2", "fl2_w8" ...), validation
    score, FP32 leading Convs and whether its weights are 8-bit instead of 7-bit."""

    tag: str
    score: float
    leading: int
    w8: bool = False


def pick_placement(
    base: Variant,
    built: dict[str, Variant],
    ladder: tuple[int, ...],
    speedup: Callable[[Variant, Variant], float],
    gain: float = AUTO_FLOAT_GAIN,
    faster: float = AUTO_FLOAT_SPEED,
) -> tuple[Variant, list[str]]:
    """The placement to keep, and why. 8-bit weights alone only when better than ``base``; then up the ``ladder``
    of FP32 leading convs (each rung taking its 8-bit variant when that is better), a rung is kept only when
    ``gain`` points better than what is kept so far, or as good and ``faster`` (``speedup(kept, rung)``)."""
    current = built["w8"] if "w8" in built and built["w8"].score > base.score else base
    notes = []
    for n in ladder:
        w8 = built.get(f"fl{n}_w8")
        rung = w8 if w8 is not None and w8.score > built[f"fl{n}"].score else built[f"fl{n}"]
        gain_x = speedup(current, rung)
        if rung.score >= current.score + gain or (rung.score >= current.score and gain_x >= faster):
            notes.append(
                f"first {n} Convs kept FP32: val score {current.score:.2f} -> {rung.score:.2f}, "
                f"{gain_x:.2f}x the speed of the graph with {current.leading} FP32 Convs"
            )
            current = rung
    if current.w8:
        w7 = built[current.tag.removesuffix("_w8")].score if current.tag != "w8" else base.score
        notes.append(f"8-bit weights (reduce_range off): val score {w7:.2f} with 7-bit -> {current.score:.2f}")
    return current, notes


def choose_int8(final: dict[str, float], fallback_to_ptq: bool) -> str:
    """Which INT8 candidate ships, by final validation score: QAT when at least as good as PTQ (or when falling back
    is off), else ORT static (text, built only where it measured faster) or PTQ."""
    if "qat" in final and (final["qat"] >= final["ptq"] or not fallback_to_ptq):
        return "qat"
    return "static" if "static" in final else "ptq"

"""The INT8 choices as pure functions on plain numbers (edgetl/compress/select.py)."""

from __future__ import annotations

from edgetl.compress.select import Variant, choose_int8, pick_placement, score
from edgetl.tasks.base import Metric


def test_score_makes_every_metric_higher_is_better():
    assert score(Metric("acc", 80.0)) == 80.0 and score(Metric("WER", 12.0, higher_is_better=False)) == -12.0


def test_choose_int8_prefers_qat_when_as_good_and_falls_back_otherwise():
    assert choose_int8({"ptq": 80.0, "qat": 80.0}, fallback_to_ptq=True) == "qat"
    assert choose_int8({"ptq": 80.5, "qat": 80.0}, fallback_to_ptq=True) == "ptq"
    assert choose_int8({"ptq": 80.5, "qat": 80.0}, fallback_to_ptq=False) == "qat"
    assert choose_int8({"ptq": 80.0, "static": 80.0}, fallback_to_ptq=True) == "static"
    assert choose_int8({"ptq": 80.0}, fallback_to_ptq=True) == "ptq"


def _built(fl2: float, fl2_w8: float | None = None, fl6: float = 0.0, w8: float | None = None) -> dict:
    out = {"fl2": Variant("fl2", fl2, 2), "fl6": Variant("fl6", fl6, 6)}
    if fl2_w8 is not None:
        out["fl2_w8"] = Variant("fl2_w8", fl2_w8, 2, w8=True)
    if w8 is not None:
        out["w8"] = Variant("w8", w8, 0, w8=True)
    return out


def test_a_rung_is_kept_when_clearly_better_or_as_good_and_faster():
    base = Variant("", 80.0, 0)
    kept, notes = pick_placement(base, _built(fl2=80.6), (2, 6), lambda a, b: 0.9)  # better by >= 0.5, slower
    assert kept.tag == "fl2" and "first 2 Convs kept FP32" in notes[0]
    kept, _ = pick_placement(base, _built(fl2=80.0), (2, 6), lambda a, b: 1.05)  # a tie, 5% faster
    assert kept.tag == "fl2"
    kept, notes = pick_placement(base, _built(fl2=80.0), (2, 6), lambda a, b: 1.0)  # a tie, no faster
    assert kept is base and notes == []


def test_eight_bit_weights_pair_with_the_fp32_stem():
    """8-bit weights alone lose (-0.5) and the FP32 stem alone gains too little (+0.2), but the pair wins (+1.0):
    the pair is a rung of its own, so judging them one after the other cannot miss it."""
    base = Variant("", 80.0, 0)
    kept, notes = pick_placement(base, _built(fl2=80.2, fl2_w8=81.0, w8=79.5), (2,), lambda a, b: 1.0)
    assert kept.tag == "fl2_w8" and kept.w8 and any("8-bit weights" in n for n in notes)


def test_speed_is_measured_against_the_variant_kept_so_far():
    seen = []

    def speed(a, b):
        seen.append((a.tag, b.tag))
        return 1.1

    pick_placement(Variant("", 80.0, 0), _built(fl2=80.0, fl6=80.0), (2, 6), speed)
    assert seen == [("", "fl2"), ("fl2", "fl6")]

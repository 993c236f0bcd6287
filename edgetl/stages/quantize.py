"""INT8: quantization-aware training and/or ORT post-training quantization, ending in a QDQ ONNX model that
ONNX Runtime executes with int8 kernels (QLinearConv / MatMulInteger), never slower than FP32 unannounced.

Design (measured on this stack, see docs/benchmarks.md): Q/DQ placement is left to ONNX Runtime's own static
quantizer, because it puts them exactly where ORT fuses (uint8 activations, int8 per-channel weights, QDQ format);
QAT (``edgetl.compress.qat``) makes the *weights* robust to that quantization, then the fake-quant is removed, the
trained FP32 weights are exported and ORT quantizes them with calibration. ORT's PTQ of the same model is always
built too: it is the baseline, and the fallback when QAT is less good on validation or fails. Where the modality
allows Conv placements, variants of both are measured on validation before choosing, each alone and paired: the
first 2, then 6 Convs in FP32 (``float_leading_convs: auto``) and, without VNNI, 8-bit instead of 7-bit weights.
Models on a dynamic-INT8 modality (text) build ORT dynamic INT8 and, with ``try_static``, static QDQ beside it.
Finally the INT8 model must beat the FP32 one on measured latency; if it does not, only Conv/MatMul/Gemm are
quantized, and if that is still slower FP32 ships and the report says why. The choices themselves are pure
functions in ``edgetl.compress.select``.
"""

from __future__ import annotations

from pathlib import Path

from edgetl.compress.ort_quant import FUSED_OPS, float_compute_ops, optimized_ops, quantize_onnx
from edgetl.compress.qat import qat
from edgetl.compress.select import Variant, choose_int8, pick_placement, score
from edgetl.config import QuantizeCfg, Recipe
from edgetl.errors import EdgetlError
from edgetl.measure import ort_metric, speedup
from edgetl.onnx_export import bundle_metadata, export_onnx
from edgetl.state import State, float_role

AUTO_FLOAT_LEADING = (2, 6)  # float_leading_convs "auto": stem + first depthwise conv, then the first two blocks


def _text_static(
    state: State,
    src: Path,
    dynamic: Path,
    cfg: QuantizeCfg,
    reduce_range: bool,
    val,
    dynamic_score,
    feed1: dict,
    threads: int,
) -> tuple[dict, Path | None]:
    """ORT static QDQ of the weight MatMuls (activations calibrated on training texts padded to max_length) against
    the dynamic INT8 model: validation score, speed interleaved at ``threads``. Static ships only when it is at least
    5% faster and not less good; returns (what was measured, its file or None once removed)."""
    from edgetl.runner import interleaved_latency, session

    calib = state.modality.calibration(state.data.train, cfg.calibration_size)
    path = quantize_onnx(
        src, state.workdir / "model.static.onnx", calib, cfg, reduce_range, op_types=("MatMul", "Gemm")
    )
    got = score(ort_metric(state.task, path, *val))
    lat = interleaved_latency(
        {"fp32": session(src, threads), "dynamic": session(dynamic, threads), "static": session(path, threads)},
        feed1,
        runs=60,
        warmup=5,
    )
    speed = {k: lat["fp32"]["p50_ms"] / lat[k]["p50_ms"] for k in ("dynamic", "static")}
    ships = speed["static"] >= 1.05 * speed["dynamic"] and got >= dynamic_score
    note = (
        f"static QDQ INT8 {speed['static']:.2f}x FP32 at val {got:.2f} vs dynamic {speed['dynamic']:.2f}x at "
        f"{dynamic_score:.2f}: {'static' if ships else 'dynamic'} ships"
    )
    if not ships:
        path.unlink()
    measured = {
        "val_metric": got,
        "speedup_static": speed["static"],
        "speedup_dynamic": speed["dynamic"],
        "ships": ships,
        "note": note,
    }
    return measured, path if ships else None


def _placements(
    state: State,
    role: str,
    src: Path,
    base_path: Path,
    base_score: float,
    calib: list[dict],
    cfg: QuantizeCfg,
    reduce_range: bool,
    leading: int,
    val,
    feed1: dict,
    threads: int,
) -> dict:
    """Placement and weight-width variants of the INT8 candidate ``role`` (quantized from ``src``), judged together
    on validation (``select.pick_placement``): the stem + first depthwise conv in FP32 (a 3-channel stem is a poor
    int8 GEMM, K = 27, so FP32 there is often faster as well as more accurate), then the first two blocks (the early
    high-resolution layers where EfficientNet-Lite0 lost 1-2 pt) and, without VNNI, 8-bit instead of 7-bit weights
    (7-bit keeps u8 x s8 pair sums inside int16; where the layer that saturates, an int8 stem on raw pixels, stays
    FP32, 8-bit can be the more accurate model). 8-bit pays mostly *with* the FP32 stem, so the pairs are built too.
    Returns the kept variant (its role ``<role>_<tag>``, or ``role`` itself with tag ""; path, score, leading FP32
    convs, reduce_range) and notes; every other variant is deleted."""
    try_fl = cfg.float_leading_convs == "auto"
    try_w8 = cfg.reduce_range is None and reduce_range
    variants = [("w8", leading, False)] if try_w8 else []
    for n in AUTO_FLOAT_LEADING if try_fl else ():
        variants += [(f"fl{n}", n, reduce_range)] + ([(f"fl{n}_w8", n, False)] if try_w8 else [])
    paths, built = {"": base_path}, {}
    for tag, fl_n, rr in variants:
        paths[tag] = quantize_onnx(
            src,
            state.workdir / f"model.{role}-{tag.replace('_', '-')}.onnx",
            calib,
            cfg,
            rr,
            float_leading=fl_n,
            float_tail=state.task.float_tail,
        )
        built[tag] = Variant(tag, score(ort_metric(state.task, paths[tag], *val)), fl_n, not rr)
    kept, notes = pick_placement(
        Variant("", base_score, leading),
        built,
        AUTO_FLOAT_LEADING if try_fl else (),
        lambda a, b: speedup(paths[a.tag], paths[b.tag], feed1, threads=threads),
    )
    for tag, path in paths.items():
        if tag not in ("", kept.tag):
            path.unlink()
    return {
        "tag": kept.tag,
        "role": f"{role}_{kept.tag}" if kept.tag else role,
        "path": paths[kept.tag],
        "score": kept.score,
        "fl": kept.leading,
        "reduce_range": False if kept.w8 else reduce_range,
        "notes": notes,
    }


def run(state: State, recipe: Recipe) -> State:
    from edgetl.runner import cpu_int8_features

    cfg, mod, task = recipe.quantize, state.modality, state.task
    src_role = float_role(state)
    if src_role is None:
        raise EdgetlError("quantize needs an FP32 ONNX model: keep the export section")
    src = state.workdir / state.onnx[src_role]
    features = cpu_int8_features()
    reduce_range = cfg.reduce_range if cfg.reduce_range is not None else not features["vnni_or_dot"]
    calib = mod.calibration(state.data.train, cfg.calibration_size) if mod.static_int8 else None
    val = (mod.feeds(state.data.val, annotate=True), mod.targets(state.data.val))
    feed1 = mod.latency_feed(state.data.test)
    threads = recipe.verify.threads if recipe.verify else 1  # speed is judged at the threads the gates measure at

    onnx, models, notes = dict(state.onnx), dict(state.models), []
    float_src = {"ptq": src}  # the FP32 ONNX each INT8 candidate was quantized from
    leading = 0 if cfg.float_leading_convs == "auto" else cfg.float_leading_convs
    ptq = quantize_onnx(
        src,
        state.workdir / "model.ptq.onnx",
        calib,
        cfg,
        reduce_range,
        float_leading=leading,
        float_tail=task.float_tail,
    )
    onnx["ptq"], models["ptq"] = ptq.name, state.backbone.model
    candidates = {"ptq": score(ort_metric(task, ptq, *val))}
    history = None
    static = None
    if (
        not mod.static_int8 and cfg.try_static and not getattr(task, "generates", False)
    ):  # dynamic vs static, measured here: the faster at no metric cost
        static, static_path = _text_static(state, src, ptq, cfg, reduce_range, val, candidates["ptq"], feed1, threads)
        notes.append(static["note"])
        if static_path:
            onnx["static"], models["static"], float_src["static"] = static_path.name, state.backbone.model, src
            candidates["static"] = static["val_metric"]
    if cfg.method == "qat" and not mod.supports_qat:
        notes.append(f"QAT is not implemented for {mod.name} models; ORT PTQ instead (see the dynamic vs static note)")
    elif cfg.method == "qat":
        try:
            qat_model, history = qat(state, recipe, cfg, reduce_range)
            qat_fp32 = export_onnx(
                qat_model,
                state.backbone.contract,
                state.workdir / "model.qat.fp32.onnx",
                val[0][0],
                recipe.export.opset,
                bundle_metadata(state, qat_model),
                task.optimum_task,
            )
            float_src["qat"] = qat_fp32
            qat_path = quantize_onnx(
                qat_fp32,
                state.workdir / "model.qat.onnx",
                calib,
                cfg,
                reduce_range,
                float_leading=leading,
                float_tail=task.float_tail,
            )
            onnx["qat"], models["qat"] = qat_path.name, qat_model
            candidates["qat"] = score(ort_metric(task, qat_path, *val))
        except EdgetlError:
            raise
        except Exception as e:  # noqa: BLE001 - a QAT failure falls back to PTQ when allowed, and says so
            for name in ("model.qat.fp32.onnx", "model.qat.onnx"):  # half-written files stay out of the bundle
                (state.workdir / name).unlink(missing_ok=True)
            history = None  # the QAT model was thrown away: its curve is not the shipped model's
            float_src.pop("qat", None)
            onnx.pop("qat", None)
            models.pop("qat", None)
            if not cfg.fallback_to_ptq:
                raise EdgetlError(f"QAT failed ({type(e).__name__}: {e}); set quantize.fallback_to_ptq: true") from None
            notes.append(f"QAT failed ({type(e).__name__}: {e}); shipped ORT PTQ instead")
    # Placement and weight-width variants of each candidate (PTQ and QAT), judged on validation before choosing
    # between them (the best QAT graph and the best PTQ graph can be different placements)
    picks = {
        r: _placements(
            state,
            r,
            float_src[r],
            state.workdir / onnx[r],
            candidates[r],
            calib,
            cfg,
            reduce_range,
            leading,
            val,
            feed1,
            threads,
        )
        for r in ("ptq", "qat")
        if r in candidates and mod.conv_placements
    }
    final = {r: picks[r]["score"] if r in picks else s for r, s in candidates.items()}
    chosen = choose_int8(final, cfg.fallback_to_ptq)
    if "qat" in candidates and chosen == "ptq":
        names = {r: picks[r]["role"] if r in picks else r for r in ("qat", "ptq")}
        notes.append(
            f"QAT val {task.metric_name} {final['qat']:.2f} ({names['qat']}) < PTQ {final['ptq']:.2f} "
            f"({names['ptq']}): shipped PTQ"
        )
    for role, pick in picks.items():  # the other candidate's kept variant is deleted
        if role != chosen and pick["tag"]:
            pick["path"].unlink()
    fl = leading
    if (pick := picks.get(chosen)) is not None:
        notes += pick["notes"]
        fl, reduce_range = pick["fl"], pick["reduce_range"]
        if pick["tag"]:
            tagged = pick["role"]
            float_src[tagged], onnx[tagged], models[tagged] = float_src[chosen], pick["path"].name, models[chosen]
            candidates[tagged], chosen = pick["score"], tagged

    # INT8 must not ship slower than FP32 without saying so
    gain = speedup(src, state.workdir / onnx[chosen], feed1, threads=threads)
    if gain < 1.0 and cfg.require_speedup:
        conservative = quantize_onnx(
            float_src[chosen],
            state.workdir / "model.int8-conv.onnx",
            calib,
            cfg,
            reduce_range,
            op_types=FUSED_OPS,
            float_leading=fl,
        )
        s2 = speedup(src, conservative, feed1, threads=threads)
        notes.append(f"full INT8 was {gain:.2f}x FP32 speed; Conv/MatMul/Gemm-only INT8 is {s2:.2f}x")
        if s2 >= 1.0:
            onnx["int8_conv"], models["int8_conv"] = conservative.name, models[chosen]
            candidates["int8_conv"] = score(ort_metric(task, conservative, *val))
            chosen, gain = "int8_conv", s2
        else:
            conservative.unlink()
            notes.append("INT8 is slower than FP32 on this CPU: shipping FP32")
            chosen = None
    for path in float_src.values():
        if path != src:
            path.unlink(missing_ok=True)
    ops = optimized_ops(state.workdir / onnx[chosen]) if chosen else {}
    for note in notes:
        print(f"  note: {note}")
    if chosen:
        print(
            f"  shipped INT8: {chosen} (val {task.metric_name} {candidates[chosen]:.2f}, {gain:.2f}x FP32 at "
            f"{threads} thread(s)), float Conv/MatMul left in ORT graph: {float_compute_ops(ops)}"
        )
    placements = {r: {"kept": p["tag"] or None, "val_metric": p["score"]} for r, p in picks.items()}
    metrics = {
        "method": cfg.method,
        "chosen": chosen,
        "source": src_role,
        "metric": task.metric_name,
        "val_metric_ort": candidates,
        "placements": placements,
        "float_leading_convs": fl if chosen else None,
        "text_static_vs_dynamic": static,
        "speedup_vs_fp32": gain,
        "speed_threads": threads,
        "reduce_range": reduce_range,
        "cpu_int8": features,
        "optimized_ops": ops,
        "float_compute_ops_left": float_compute_ops(ops),
        "notes": notes,
    }
    hist = {**state.history, "qat": history} if history else state.history
    return state.replace(onnx=onnx, models=models, history=hist, metrics={**state.metrics, "quantize": metrics})

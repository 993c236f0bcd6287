"""INT8: quantization-aware training and/or ORT post-training quantization, ending in a QDQ ONNX model that
ONNX Runtime executes with int8 kernels (QLinearConv / MatMulInteger), never slower than FP32 unannounced.

Design (measured on this stack, see docs/benchmarks.md): Q/DQ placement is left to ONNX Runtime's own static quantizer,
because it puts them exactly where ORT fuses (uint8 activations, int8 per-channel weights, QDQ format). QAT
makes the *weights* robust to that quantization: a fake-quant pass mirrors it during fine-tuning

- weights: symmetric per-output-channel int8 (7-bit with ``reduce_range``), straight-through gradients. BatchNorm
  statistics are frozen, and since per-channel symmetric scales follow any per-channel factor, quantizing the
  unfolded weight is the same grid as quantizing the BN-folded weight ORT sees;
- activations: asymmetric uint8 on the input of every Conv/Linear, ranges tracked by EMA min/max.

After QAT the fake-quant is removed, the trained FP32 weights are exported and ORT quantizes them with
calibration. ORT's PTQ of the same model is always built too: it is the baseline, and the fallback when QAT
is less accurate on validation or fails. Placement variants of both are measured on validation before choosing,
each alone and paired: the first 2, then 6 Convs in FP32 (``float_leading_convs: auto``; stem + first depthwise
conv, then the first two blocks) and, without VNNI, 8-bit instead of 7-bit weights (``reduce_range`` unset).
Finally the INT8 model must beat the FP32 one on measured latency; if it does not, only Conv/MatMul/Gemm are
quantized, and if that is still slower FP32 ships and the report says why.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from edgetl.config import QuantizeCfg, Recipe
from edgetl.errors import EdgetlError
from edgetl.pipeline import State, float_role
from edgetl.stages.verify import ort_accuracy

FUSED_OPS = ("Conv", "MatMul", "Gemm")  # the conservative placement: only what ORT runs as int8 kernels
AUTO_FLOAT_LEADING = (2, 6)  # float_leading_convs "auto": stem + first depthwise conv, then the first two blocks ...
AUTO_FLOAT_GAIN = 0.5  # ... each kept FP32 when at least this many points more accurate on validation than the last,
AUTO_FLOAT_SPEED = 1.03  # ... or at least as accurate and this much faster (measured interleaved at verify.threads)


# ---------------------------------------------------------------------------------------------------------------
# ORT static quantization


def quantize_onnx(src: Path, dst: Path, calib: list[dict] | None, cfg: QuantizeCfg, reduce_range: bool,
                  op_types: tuple[str, ...] | None = None, float_leading: int = 0) -> Path:
    """ORT static quantization of ``src`` into QDQ ``dst``, calibrated on the ``calib`` feeds, with the first
    ``float_leading`` Convs left FP32; with ``calib`` None, ORT dynamic quantization (int8 weights, activations
    quantized at run time: transformers)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib or [])

        def get_next(self):
            return next(self.batches, None)

    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw export instead
        pre = src
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
    try:
        if calib is None:
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
                             reduce_range=reduce_range, op_types_to_quantize=list(op_types) if op_types else None)
            return dst
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types) if op_types else None, per_channel=cfg.per_channel,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, nodes_to_exclude=_float_nodes(pre, float_leading),
                        extra_options={"ActivationSymmetric": False})
    finally:
        if pre != src:
            pre.unlink(missing_ok=True)
    return dst


def _float_nodes(path: Path, float_leading_convs: int = 0) -> list[str]:
    """Nodes the static quantizer must leave in float:

    - the shape arithmetic (Shape -> Gather/Div/Ceil/Sub/Mul/Concat -> Cast -> Pad pads) that timm's dynamic
      "same" padding exports. ORT calibrates and Q/DQs those float scalars like activations; a pad of 1.0
      comes back as 0.99..., the Cast to int64 truncates it to 0 and every stride-2 conv then sees a shifted,
      smaller feature map (24x24 -> 22x22, 6x6 -> 4x4 on EfficientNet-Lite0 at 96 px: 87% -> 50%);
    - the first ``float_leading_convs`` Convs (``quantize.float_leading_convs``): where a noise-sensitive
      network amplifies quantization noise the most; at full resolution they are cheap in FP32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    const = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    shape_derived: set = set()
    names = []
    for node in graph.node:  # topological order
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size") or (
                ins and all(i in shape_derived or i in const for i in ins) and any(i in shape_derived for i in ins)):
            shape_derived.update(node.output)
            names.append(node.name)
    names += [n.name for n in graph.node if n.op_type == "Conv"][:float_leading_convs]
    return [n for n in names if n]


def optimized_ops(path: Path) -> dict:
    """Op-type counts of the graph ORT actually runs (after its optimizer fused Q/DQ into int8 kernels)."""
    import onnx
    import onnxruntime as ort

    out = path.with_suffix(".opt.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts: dict = {}
    for node in onnx.load(str(out)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    out.unlink(missing_ok=True)
    return counts


def float_compute_ops(counts: dict) -> int:
    """Float convolutions / matrix products left on the hot path of an optimized graph."""
    return sum(counts.get(op, 0) for op in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm"))


# ---------------------------------------------------------------------------------------------------------------
# fake quantization for QAT


def _weight_fq(qmax: int):
    import torch

    class WeightFakeQuant(torch.nn.Module):
        """Symmetric per-output-channel int8 fake quantization (straight-through gradient)."""

        def forward(self, w):
            dims = tuple(range(1, w.dim()))
            scale = (w.detach().abs().amax(dim=dims) / qmax).clamp(min=1e-8).float()
            zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax, qmax)

    return WeightFakeQuant()


def _act_fq(momentum: float = 0.1):
    import torch

    class ActFakeQuant(torch.nn.Module):
        """Asymmetric uint8 fake quantization with EMA min/max ranges (frozen in eval mode)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("lo", torch.tensor(0.0))
            self.register_buffer("hi", torch.tensor(0.0))
            self.register_buffer("seen", torch.tensor(False))

        def forward(self, x):
            if self.training:
                lo, hi = x.detach().min(), x.detach().max()
                if not bool(self.seen):
                    self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
                else:
                    self.lo.lerp_(lo, momentum), self.hi.lerp_(hi, momentum)
            lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
            if hi - lo < 1e-8:
                return x
            scale = (hi - lo) / 255.0
            zero = int(min(max(round(-lo / scale), 0), 255))
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    return ActFakeQuant()


def attach_fake_quant(model, reduce_range: bool) -> list:
    """Fake-quantize the weights and inputs of every Conv/Linear in place; returns hook handles for detach."""
    import torch.nn as nn
    from torch.nn.utils import parametrize

    qmax = 63 if reduce_range else 127
    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(m, "weight", _weight_fq(qmax))
            m.edgetl_act_fq = _act_fq()
            handles.append(m.register_forward_pre_hook(lambda mod, args: (mod.edgetl_act_fq(args[0]), *args[1:])))
    return handles


def detach_fake_quant(model, handles: list) -> None:
    """Back to a plain float model holding the QAT-trained weights."""
    import torch.nn as nn
    from torch.nn.utils import parametrize

    for h in handles:
        h.remove()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            del m.edgetl_act_fq


def qat(state: State, recipe: Recipe, cfg: QuantizeCfg, reduce_range: bool):
    """Quantization-aware fine-tuning of a copy of the current model; returns (float model, history)."""
    import torch

    from edgetl.data import make_loader
    from edgetl.train import Distill, call, fit, freeze_frozen_batchnorm

    model = copy.deepcopy(state.backbone.model)
    for m in model.modules():  # BN statistics and affine frozen: the folded weights ORT sees stay put
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad_(False)
    handles = attach_fake_quant(model, reduce_range)
    pre = state.backbone.contract.preprocess
    bs = recipe.data.batch_size
    train = make_loader(state.data.train, pre, bs, augment=recipe.data.augment, shuffle=True, seed=recipe.seed + 30,
                        tokenizer=state.tokenizer)
    val = make_loader(state.data.val, pre, bs, tokenizer=state.tokenizer)
    model.train()
    freeze_frozen_batchnorm(model)
    with torch.no_grad():  # initialise activation ranges before the first update
        for i, (x, _) in enumerate(train):
            call(model, x)
            if i == 3:
                break
    distill = None
    if cfg.distill and state.teacher is not None:  # same KD weights as the distill stage when there is one
        kd = recipe.distill
        distill = Distill(state.teacher, kd.alpha, kd.temperature) if kd else Distill(state.teacher)
    params = [p for p in model.parameters() if p.requires_grad]
    history = fit(model, train, val, param_groups=[{"params": params, "lr": cfg.lr}], epochs=cfg.epochs, lr=cfg.lr,
                  warmup_epochs=0.0, distill=distill, desc="qat")
    detach_fake_quant(model, handles)
    return model.eval(), history


# ---------------------------------------------------------------------------------------------------------------
# the stage


def _speedup(fp32: Path, int8: Path, feed: dict, runs: int = 60, threads: int = 1) -> float:
    """p50(FP32) / p50(INT8) at batch 1 with the thread count the build verifies at, measured interleaved."""
    from edgetl.runner import interleaved_latency, session

    sessions = {"fp32": session(fp32, threads), "int8": session(int8, threads)}
    lat = interleaved_latency(sessions, feed, runs=runs, warmup=5)
    return lat["fp32"]["p50_ms"] / lat["int8"]["p50_ms"]


def _text_static(state: State, src: Path, dynamic: Path, cfg: QuantizeCfg, reduce_range: bool, val_feeds: list,
                 val_y: np.ndarray, dynamic_acc: float, feed1: dict, threads: int) -> tuple[dict, Path | None]:
    """ORT static QDQ of the weight MatMuls (activations calibrated on training texts padded to max_length) against
    the dynamic INT8 model: accuracy on validation, speed interleaved at ``threads``. Static ships only when it is
    at least 5% faster and not less accurate; returns (what was measured, its file or None once removed)."""
    from edgetl.data import feeds
    from edgetl.runner import interleaved_latency, session

    pre = state.backbone.contract.preprocess
    calib = feeds(state.data.train, pre, state.tokenizer, batch=16, limit=cfg.calibration_size,
                  pad_to=pre.get("max_length"))
    path = quantize_onnx(src, state.workdir / "model.static.onnx", calib, cfg, reduce_range,
                         op_types=("MatMul", "Gemm"))
    acc = ort_accuracy(path, val_feeds, val_y)
    lat = interleaved_latency({"fp32": session(src, threads), "dynamic": session(dynamic, threads),
                               "static": session(path, threads)}, feed1, runs=60, warmup=5)
    speed = {k: lat["fp32"]["p50_ms"] / lat[k]["p50_ms"] for k in ("dynamic", "static")}
    ships = speed["static"] >= 1.05 * speed["dynamic"] and acc >= dynamic_acc
    note = (f"static QDQ INT8 {speed['static']:.2f}x FP32 at val {acc:.2f}% vs dynamic {speed['dynamic']:.2f}x at "
            f"{dynamic_acc:.2f}%: {'static' if ships else 'dynamic'} ships")
    if not ships:
        path.unlink()
    measured = {"val_acc": acc, "speedup_static": speed["static"], "speedup_dynamic": speed["dynamic"],
                "ships": ships, "note": note}
    return measured, path if ships else None


def _placements(state: State, role: str, src: Path, base_path: Path, base_acc: float, calib: list[dict],
                cfg: QuantizeCfg, reduce_range: bool, leading: int, val_feeds: list, val_y, feed1: dict,
                threads: int) -> dict:
    """Placement and weight-width variants of the INT8 candidate ``role`` (quantized from ``src``), judged together
    on validation: the stem + first depthwise conv in FP32 (float_leading_convs auto: a 3-channel stem is a poor
    int8 GEMM, K = 27, so FP32 there is often faster as well as more accurate), then the first two blocks (the
    early high-resolution layers where EfficientNet-Lite0 lost 1-2 pt) and, without VNNI, 8-bit instead of 7-bit
    weights (7-bit keeps u8 x s8 pair sums inside int16; where the layer that saturates, an int8 stem on raw
    pixels, stays FP32, 8-bit can be the more accurate model). 8-bit pays mostly *with* the FP32 stem, so the
    pairs are built too: trying them one after the other misses a pair when neither alone wins.

    Per stem placement, 8-bit weights only when more accurate; then, up the ladder of FP32 leading convs, each
    rung only when at least AUTO_FLOAT_GAIN points more accurate than the placement kept so far, or as accurate
    and AUTO_FLOAT_SPEED faster than it (measured interleaved). Returns the kept variant (its role
    ``<role>_<tag>``, or ``role`` itself with tag ""; path, val accuracy, leading FP32 convs, reduce_range) and
    notes; every other variant is deleted."""
    try_fl = cfg.float_leading_convs == "auto"
    try_w8 = cfg.reduce_range is None and reduce_range
    variants = [("w8", leading, False)] if try_w8 else []
    for n in AUTO_FLOAT_LEADING if try_fl else ():
        variants += [(f"fl{n}", n, reduce_range)] + ([(f"fl{n}_w8", n, False)] if try_w8 else [])
    built: dict = {}  # tag -> (path, val accuracy)
    for tag, fl_n, rr in variants:
        path = quantize_onnx(src, state.workdir / f"model.{role}-{tag.replace('_', '-')}.onnx", calib, cfg, rr,
                             float_leading=fl_n)
        built[tag] = (path, ort_accuracy(path, val_feeds, val_y))
    best = "w8" if "w8" in built and built["w8"][1] > base_acc else ""
    current, fl, notes = (built[best] if best else (base_path, base_acc)), leading, []
    for n in AUTO_FLOAT_LEADING if try_fl else ():
        tag = f"fl{n}_w8" if f"fl{n}_w8" in built and built[f"fl{n}_w8"][1] > built[f"fl{n}"][1] else f"fl{n}"
        acc = built[tag][1]
        gain = _speedup(current[0], built[tag][0], feed1, threads=threads)
        if acc >= current[1] + AUTO_FLOAT_GAIN or (acc >= current[1] and gain >= AUTO_FLOAT_SPEED):
            notes.append(f"first {n} Convs kept FP32: val accuracy {current[1]:.2f}% -> {acc:.2f}%, {gain:.2f}x the "
                         f"speed of the graph with {fl} FP32 Convs")
            best, current, fl = tag, built[tag], n
    if "w8" in best:
        w7 = built[best.removesuffix("_w8")][1] if best != "w8" else base_acc
        notes.append(f"8-bit weights (reduce_range off): val accuracy {w7:.2f}% with 7-bit -> {built[best][1]:.2f}%")
    for tag, (path, _) in built.items():
        if tag != best:
            path.unlink()
    return {"tag": best, "role": f"{role}_{best}" if best else role, "path": current[0], "acc": current[1], "fl": fl,
            "reduce_range": False if "w8" in best else reduce_range, "notes": notes}


def run(state: State, recipe: Recipe) -> State:
    from edgetl.data import feeds
    from edgetl.runner import cpu_int8_features
    from edgetl.stages.export import bundle_metadata, export_onnx
    from edgetl.stages.verify import latency_feed

    cfg = recipe.quantize
    src_role = float_role(state)
    if src_role is None:
        raise EdgetlError("quantize needs an FP32 ONNX model: keep the export section")
    src = state.workdir / state.onnx[src_role]
    pre = state.backbone.contract.preprocess
    features = cpu_int8_features()
    reduce_range = cfg.reduce_range if cfg.reduce_range is not None else not features["vnni_or_dot"]
    text = pre.get("kind") == "text"
    calib = None if text else feeds(state.data.train, pre, batch=16, limit=cfg.calibration_size)
    val_feeds, val_y = feeds(state.data.val, pre, state.tokenizer), state.data.val.labels
    feed1 = latency_feed(state)
    threads = recipe.verify.threads if recipe.verify else 1  # speed is judged at the threads the gates measure at

    onnx, models, notes = dict(state.onnx), dict(state.models), []
    float_src = {"ptq": src}  # the FP32 ONNX each INT8 candidate was quantized from
    leading = 0 if cfg.float_leading_convs == "auto" else cfg.float_leading_convs
    ptq = quantize_onnx(src, state.workdir / "model.ptq.onnx", calib, cfg, reduce_range, float_leading=leading)
    onnx["ptq"], models["ptq"] = ptq.name, state.backbone.model
    candidates = {"ptq": ort_accuracy(ptq, val_feeds, val_y)}
    history = None
    static = None
    if text and cfg.try_static:  # dynamic vs static, measured here: ship whichever is faster at no accuracy cost
        static, static_path = _text_static(state, src, ptq, cfg, reduce_range, val_feeds, val_y, candidates["ptq"],
                                           feed1, threads)
        notes.append(static["note"])
        if static_path:
            onnx["static"], models["static"], float_src["static"] = static_path.name, state.backbone.model, src
            candidates["static"] = static["val_acc"]
    if cfg.method == "qat" and text:
        notes.append("QAT is not implemented for text backbones; ORT PTQ instead (see the dynamic vs static note)")
    elif cfg.method == "qat":
        try:
            qat_model, history = qat(state, recipe, cfg, reduce_range)
            qat_fp32 = export_onnx(qat_model, state.backbone.contract, state.workdir / "model.qat.fp32.onnx",
                                   val_feeds[0], recipe.export.opset, bundle_metadata(state))
            float_src["qat"] = qat_fp32
            qat_path = quantize_onnx(qat_fp32, state.workdir / "model.qat.onnx", calib, cfg, reduce_range,
                                     float_leading=leading)
            onnx["qat"], models["qat"] = qat_path.name, qat_model
            candidates["qat"] = ort_accuracy(qat_path, val_feeds, val_y)
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
    # between them (the best QAT graph and the best PTQ graph can be different placements); images only.
    picks = {r: _placements(state, r, float_src[r], state.workdir / onnx[r], candidates[r], calib, cfg, reduce_range,
                            leading, val_feeds, val_y, feed1, threads)
             for r in ("ptq", "qat") if r in candidates and calib is not None}

    def final(role: str) -> float:
        return picks[role]["acc"] if role in picks else candidates[role]

    chosen = "qat" if "qat" in candidates and (final("qat") >= final("ptq") or not cfg.fallback_to_ptq) \
        else "static" if "static" in candidates else "ptq"
    if "qat" in candidates and chosen == "ptq":
        names = {r: picks[r]["role"] if r in picks else r for r in ("qat", "ptq")}
        notes.append(f"QAT val accuracy {final('qat'):.2f}% ({names['qat']}) < PTQ {final('ptq'):.2f}% "
                     f"({names['ptq']}): shipped PTQ")
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
            candidates[tagged], chosen = pick["acc"], tagged

    # INT8 must not ship slower than FP32 without saying so
    speedup = _speedup(src, state.workdir / onnx[chosen], feed1, threads=threads)
    if speedup < 1.0 and cfg.require_speedup:
        conservative = quantize_onnx(float_src[chosen], state.workdir / "model.int8-conv.onnx", calib, cfg,
                                     reduce_range, op_types=FUSED_OPS, float_leading=fl)
        s2 = _speedup(src, conservative, feed1, threads=threads)
        notes.append(f"full INT8 was {speedup:.2f}x FP32 speed; Conv/MatMul/Gemm-only INT8 is {s2:.2f}x")
        if s2 >= 1.0:
            onnx["int8_conv"], models["int8_conv"] = conservative.name, models[chosen]
            candidates["int8_conv"] = ort_accuracy(conservative, val_feeds, val_y)
            chosen, speedup = "int8_conv", s2
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
        print(f"  shipped INT8: {chosen} (val acc {candidates[chosen]:.2f}%, {speedup:.2f}x FP32 at {threads} "
              f"thread(s)), "
              f"float Conv/MatMul left in ORT graph: {float_compute_ops(ops)}")
    placements = {r: {"kept": p["tag"] or None, "val_acc": p["acc"]} for r, p in picks.items()}
    metrics = {"method": cfg.method, "chosen": chosen, "source": src_role, "val_acc_ort": candidates,
               "placements": placements, "float_leading_convs": fl if chosen else None,
               "text_static_vs_dynamic": static,
               "speedup_vs_fp32": speedup, "speed_threads": threads, "reduce_range": reduce_range, "cpu_int8": features,
               "optimized_ops": ops, "float_compute_ops_left": float_compute_ops(ops), "notes": notes}
    hist = {**state.history, "qat": history} if history else state.history
    return state.replace(onnx=onnx, models=models, history=hist, metrics={**state.metrics, "quantize": metrics})

"""ONNX Runtime quantization: static QDQ (uint8 activations calibrated on real inputs, int8 per-channel weights,
placed by ORT's own quantizer exactly where ORT fuses int8 kernels) or dynamic (transformers), and what the optimized
graph actually runs."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from edgetl.config import QuantizeCfg

FUSED_OPS = ("Conv", "MatMul", "Gemm")  # the conservative placement: only what ORT runs as int8 kernels


@contextlib.contextmanager
def _quiet_quantizer():
    """ORT's quantizer logs known-harmless advice on the root logger in every build ("Please consider to run
    pre-processing before quantization": edgetl runs quant_pre_process itself); keep it out of build logs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(
    src: Path,
    dst: Path,
    calib: list[dict] | None,
    cfg: QuantizeCfg,
    reduce_range: bool,
    op_types: tuple[str, ...] | None = None,
    float_leading: int = 0,
    float_tail: bool = False,
) -> Path:
    """``quantize_file`` of ``src`` into ``dst``; a seq2seq model's decoder beside ``src`` is quantized beside ``dst``
    (dynamic only: the decoder's activations depend on its own generated tokens, which no calibration set holds)."""
    from edgetl.runner import decoder_path

    decoder = decoder_path(src)
    if decoder.is_file():
        if calib is not None:
            raise ValueError("static quantization of a seq2seq model: use ORT dynamic quantization (calib None)")
        quantize_file(decoder, decoder_path(dst), None, cfg, reduce_range, op_types)
    return quantize_file(src, dst, calib, cfg, reduce_range, op_types, float_leading, float_tail)


def quantize_file(
    src: Path,
    dst: Path,
    calib: list[dict] | None,
    cfg: QuantizeCfg,
    reduce_range: bool,
    op_types: tuple[str, ...] | None = None,
    float_leading: int = 0,
    float_tail: bool = False,
) -> Path:
    """ORT static quantization of ``src`` into QDQ ``dst``, calibrated on the ``calib`` feeds, with the first
    ``float_leading`` Convs left FP32 (and with ``float_tail`` everything after the last compute ops: a detector's
    reshapes and concatenation of box deltas and class logits); with ``calib`` None, ORT dynamic quantization (int8
    weights, activations quantized at run time: transformers)."""
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
            self.batches = iter(_one_per_run(src, calib or []))

        def get_next(self):
            return next(self.batches, None)

    ops = list(op_types) if op_types else None
    pre = dst.with_suffix(".pre.onnx")
    with _quiet_quantizer():
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw export instead
            pre = src
        if float_tail and ops is None and _decodes_boxes(pre):
            # a graph that decodes its own boxes (a two-stage detector: proposals, RoIAlign, NMS) quantizes its compute
            # only: its coordinate and index tensors (proposals, the RoIs' Concat / Gather) stay float
            ops = list(FUSED_OPS)
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[cfg.calibration_method]
        try:
            if calib is None:
                quantize_dynamic(
                    str(pre),
                    str(dst),
                    weight_type=QuantType.QInt8,
                    per_channel=cfg.per_channel,
                    reduce_range=reduce_range,
                    op_types_to_quantize=ops,
                    extra_options={"EnableSubgraph": True},  # inside If branches too (optimum's merged decoder)
                )
            else:
                quantize_static(
                    str(pre),
                    str(dst),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=ops,
                    per_channel=cfg.per_channel,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=method,
                    nodes_to_exclude=_float_nodes(pre, float_leading, float_tail),
                    extra_options={"ActivationSymmetric": False},
                )
        finally:
            if pre != src:
                pre.unlink(missing_ok=True)
    return dst


def _decodes_boxes(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("NonMaxSuppression", "RoiAlign") for n in graph.node)


def _one_per_run(path: Path, feeds: list[dict]) -> list[dict]:
    """Calibration feeds as the graph takes them: one example each where its batch dimension is fixed at 1 (a
    two-stage detector)."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if not feeds or not dim or dim[0].dim_value != 1:
        return feeds
    return [{k: v[i : i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]


COMPUTE = ("Conv", "MatMul", "Gemm", "ConvTranspose")


def _float_nodes(path: Path, float_leading_convs: int = 0, float_tail: bool = False) -> list[str]:
    """Nodes the static quantizer must leave in float:

    - the shape arithmetic (Shape -> Gather/Div/Ceil/Sub/Mul/Concat -> Cast -> Pad pads) that timm's dynamic
      "same" padding exports. ORT calibrates and Q/DQs those float scalars like activations; a pad of 1.0
      comes back as 0.99..., the Cast to int64 truncates it to 0 and every stride-2 conv then sees a shifted,
      smaller feature map (24x24 -> 22x22, 6x6 -> 4x4 on EfficientNet-Lite0 at 96 px: 87% -> 50%);
    - the first ``float_leading_convs`` Convs (``quantize.float_leading_convs``): where a noise-sensitive
      network amplifies quantization noise the most; at full resolution they are cheap in FP32;
    - with ``float_tail``, every node between the last compute ops (Conv, MatMul) and the graph outputs: one shared
      uint8 scale over box deltas and logits is how INT8 detectors end up with no confident box (onnxruntime
      #14233); the compute stays INT8, the reshapes and the concatenation stay exact."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    const = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    shape_derived: set = set()
    names = []
    for node in graph.node:  # topological order
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size") or (
            ins and all(i in shape_derived or i in const for i in ins) and any(i in shape_derived for i in ins)
        ):
            shape_derived.update(node.output)
            names.append(node.name)
    names += [n.name for n in graph.node if n.op_type == "Conv"][:float_leading_convs]
    if float_tail:
        producer = {o: n for n in graph.node for o in n.output}
        todo, seen = [o.name for o in graph.output], set()
        while todo:  # back from the outputs, stopping at compute ops
            node = producer.get(todo.pop())
            if node is None or node.op_type in COMPUTE or id(node) in seen:
                continue
            seen.add(id(node))
            names.append(node.name)
            todo += [i for i in node.input if i]
    return [n for n in names if n]


def optimized_ops(path: Path) -> dict:
    """Op-type counts of the graph ORT actually runs (after its optimizer fused Q/DQ into int8 kernels)."""
    import onnx
    import onnxruntime as ort

    out = path.with_suffix(".opt.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = (
        3  # "Serializing optimized model with Graph Optimization level greater than ..." is asked for
    )
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts: dict = {}
    for node in onnx.load(str(out)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    out.unlink(missing_ok=True)
    return counts


def float_compute_ops(counts: dict) -> int:
    """Float convolutions / matrix products left on the hot path of an optimized graph."""
    return sum(counts.get(op, 0) for op in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm"))

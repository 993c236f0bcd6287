"""Would the detector's INT8 be faster with its depthwise convs left in FP32? (ORT's int8 depthwise kernel is slower
than its FP32 one on AVX-512 VNNI: 0.86x in ``benchmarks/int8_ops.py``.)

The detection demo's SSDLite (edgetl's head over MobileNetV2, 5 classes, random weights: kernel time does not depend
on them) exported at ``--size``, then quantized as the build does (QDQ, the box / score tail float) twice: every
Conv INT8, and every Conv but the depthwise ones INT8. Printed per thread count: each INT8 model's speed-up over FP32
and depthwise-float over all-INT8, each the median of ``--repeats`` interleaved batch-1 measurements of ``--runs``
runs, with the CPU and its int8 features.

    .venv/bin/python benchmarks/depthwise_float.py [--size 160] [--runs 200] [--repeats 5] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def depthwise(path: Path) -> list[str]:
    """Names of the depthwise Convs of the ONNX graph at ``path`` (``int8_ops.conv_kinds``' classes, in order)."""
    import onnx

    from benchmarks.int8_ops import conv_kinds

    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    return [n for n, kind in zip(names, conv_kinds(path), strict=True) if kind == "depthwise"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()

    import torch

    import edgetl.compress.ort_quant as ort_quant
    from edgetl.backbones import build_backbone
    from edgetl.config import BackboneCfg, QuantizeCfg
    from edgetl.measure import speedup
    from edgetl.onnx_export import export_onnx
    from edgetl.runner import cpu_int8_features, device_info
    from edgetl.tasks import create_task

    features = cpu_int8_features()
    print(f"{date.today()}  CPU: {device_info()['cpu']}  int8 features: {features}")
    torch.manual_seed(0)
    task = create_task("detection", [f"class{i}" for i in range(5)])
    bb = build_backbone(BackboneCfg(name="torchvision:mobilenet_v2", pretrained=False, input_size=args.size), task)
    calib = np.random.default_rng(0).standard_normal((32, 3, args.size, args.size)).astype(np.float32)
    feeds = [{"input": calib[i : i + 16]} for i in (0, 16)]
    cfg, reduce_range = QuantizeCfg(float_leading_convs=0), not features["vnni_or_dot"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = export_onnx(bb.model.eval(), bb.contract, work / "fp32.onnx", {"input": calib[:1]}, 17)
        every = ort_quant.quantize_onnx(fp32, work / "all.onnx", feeds, cfg, reduce_range, float_tail=True)
        dw = depthwise(fp32)
        base = ort_quant._float_nodes
        ort_quant._float_nodes = lambda path, leading=0, tail=False: base(path, leading, tail) + dw
        try:
            mixed = ort_quant.quantize_onnx(fp32, work / "dw.onnx", feeds, cfg, reduce_range, float_tail=True)
        finally:
            ort_quant._float_nodes = base
        feed = {"input": calib[:1]}
        print(f"SSDLite MobileNetV2 {args.size} px: {len(dw)} depthwise convs; medians of {args.repeats} x {args.runs}")
        for t in (int(x) for x in args.threads.split(",")):
            ratios = [
                np.median([speedup(a, b, feed, runs=args.runs, threads=t) for _ in range(args.repeats)])
                for a, b in ((fp32, every), (fp32, mixed), (every, mixed))
            ]
            print(
                f"  {t} thread(s): all-INT8 {ratios[0]:.2f}x FP32, depthwise-FP32 INT8 {ratios[1]:.2f}x FP32, "
                f"depthwise-FP32 vs all-INT8 {ratios[2]:.2f}x"
            )


if __name__ == "__main__":
    main()

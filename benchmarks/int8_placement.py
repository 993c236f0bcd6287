"""Where should Q/DQ go? INT8 placements side by side under ONNX Runtime, per backbone and input size.

Latency only (random-initialised weights, calibration on random normalized inputs: Q/DQ placement, not
training, decides kernel speed). For each backbone, in one process, timed interleaved in chunks of 10 runs:
  ORT FP32 | ORT quantize_static (defaults) | edgetl full QDQ (uint8 act / int8 per-channel weights, every op ORT
  quantizes) | edgetl Conv/MatMul-only QDQ (only what ORT runs as int8 kernels)
and which one the quantize stage's speed guard would ship (full if faster than FP32, else Conv-only if faster,
else FP32). Ratios are p50(ORT FP32) / p50(variant); 1 thread is the headline, 2 threads beside it.

    .venv/bin/python benchmarks/int8_placement.py [--backbones torchvision:mobilenet_v3_large,...] [--sizes 96,224]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT = ",".join(
    [
        "torchvision:mobilenet_v3_large",
        "torchvision:mobilenet_v3_small",
        "torchvision:mobilenet_v2",
        "timm:tf_efficientnet_lite0",
    ]
)


def variants(name: str, size: int, work: Path) -> dict:
    import torch

    from benchmarks.compression import ort_default_ptq
    from edgetl.backbones import build_backbone
    from edgetl.compress.ort_quant import FUSED_OPS, quantize_onnx
    from edgetl.config import BackboneCfg, QuantizeCfg
    from edgetl.onnx_export import export_onnx
    from edgetl.runner import cpu_int8_features

    torch.manual_seed(0)
    bb = build_backbone(BackboneCfg(name=name, pretrained=False, input_size=size), 10)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 3, size, size)).astype(np.float32)
    stem = name.replace(":", "_")
    fp32 = export_onnx(bb.model.eval(), bb.contract, work / f"{stem}.fp32.onnx", {"input": calib[:1]}, 17)
    batches = [{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)]
    reduce_range = not cpu_int8_features()["vnni_or_dot"]
    cfg = QuantizeCfg(float_leading_convs=0)
    return {
        "ORT FP32": fp32,
        "ORT quantize_static (defaults)": ort_default_ptq(fp32, work / f"{stem}.ortdefault.onnx", calib),
        "edgetl full QDQ": quantize_onnx(fp32, work / f"{stem}.full.onnx", batches, cfg, reduce_range),
        "edgetl Conv/MatMul-only QDQ": quantize_onnx(
            fp32, work / f"{stem}.conv.onnx", batches, cfg, reduce_range, op_types=FUSED_OPS
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default=DEFAULT)
    ap.add_argument("--sizes", default="96,224")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from edgetl.runner import device_info, interleaved_latency, session

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones.split(","):
            for size in map(int, args.sizes.split(",")):
                paths = variants(name, size, Path(tmp))
                feed = {"input": np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)}
                row = {n: {} for n in paths}
                for threads in (1, 2):
                    lat = interleaved_latency(
                        {n: session(p, threads) for n, p in paths.items()}, feed, runs=args.runs, warmup=20
                    )
                    for n in paths:
                        row[n][f"p50_{threads}t"] = lat[n]["p50_ms"]
                        row[n][f"speedup_{threads}t"] = lat["ORT FP32"]["p50_ms"] / lat[n]["p50_ms"]
                full, conv = row["edgetl full QDQ"]["speedup_1t"], row["edgetl Conv/MatMul-only QDQ"]["speedup_1t"]
                ships = "full QDQ" if full >= 1.0 else "Conv/MatMul-only" if conv >= 1.0 else "FP32"
                for n in paths:
                    rows.append({"backbone": name, "size": size, "variant": n, **row[n], "guard_ships": ships})
                print(
                    f"{name} @ {size}px: "
                    + ", ".join(f"{n} {row[n]['speedup_1t']:.2f}x" for n in paths)
                    + f" -> ships {ships}",
                    flush=True,
                )
    print(f"\ndevice: {json.dumps(device_info())}")
    print("| backbone | px | variant | p50 1t | speedup 1t | p50 2t | speedup 2t | guard ships |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['size']} | {r['variant']} | {r['p50_1t']:.2f} ms | {r['speedup_1t']:.2f}x | "
            f"{r['p50_2t']:.2f} ms | {r['speedup_2t']:.2f}x | {r['guard_ships']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

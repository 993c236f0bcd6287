"""Does INT8 still pay after deep pruning? Pruned FP32 vs pruned INT8 under ONNX Runtime, per MACs target and
channel rounding (prune.round_to).

Latency only (random-initialised weights: channel counts, not training, decide kernel speed). For each
prune.target_macs and round_to, MobileNetV2 is pruned in the recipe's 3 steps (Torch-Pruning, stem and
classifier protected), exported, and quantized the way the quantize stage does (full QDQ, uint8 activations,
int8 per-channel weights; and with the stem + first depthwise conv in FP32). All models are timed interleaved in
chunks of 10 runs, batch 1; ratios are p50(unpruned ORT FP32) / p50(variant), 1 thread the headline, 2 beside.
``--input-sizes 96,64,48`` also lowers the resolution inside the model first (``prune.input_size``: a Resize before
the first layer; the targets then count at that size, 1 = no channels removed); the reference stays the unpruned
model at ``--size``.

    .venv/bin/python benchmarks/pruned_int8.py [--targets 0.22,0.3,0.5] [--round-to 8,16,32] [--size 96]
        [--input-sizes 96,64]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = 3


def variants(
    target: float, round_to: int, size: int, work: Path, base, calib: np.ndarray, input_size: int
) -> tuple[dict, float]:
    import torch

    from edgetl.compress.ort_quant import quantize_onnx
    from edgetl.compress.prune import make_pruner, prune_step, ratio_for_macs, resize_input
    from edgetl.config import PruneCfg, QuantizeCfg
    from edgetl.measure import count_params_macs
    from edgetl.onnx_export import export_onnx
    from edgetl.runner import cpu_int8_features
    from edgetl.stages.quantize import AUTO_FLOAT_LEADING

    example = torch.randn(1, 3, size, size)

    def make(m, r):
        return make_pruner(m, example, PruneCfg(ratio=r, steps=STEPS, round_to=round_to), base.head)

    model = copy.deepcopy(base.model).eval()
    macs0 = count_params_macs(model, size)[1]
    if input_size < size:
        resize_input(model, input_size)
    if target < 1:
        ratio, _ = ratio_for_macs(model, make, size, target, steps=STEPS)
        pruner = make(model, ratio)
        for _ in range(STEPS):
            prune_step(pruner, model, example)
    left = count_params_macs(model, size)[1] / macs0
    tag = f"{target:g}_r{round_to}_{input_size}"
    fp32 = export_onnx(model, base.contract, work / f"{tag}.fp32.onnx", {"input": calib[:1]}, 17)
    batches = [{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)]
    reduce_range = not cpu_int8_features()["vnni_or_dot"]
    cfg = QuantizeCfg(float_leading_convs=0)
    return {
        "FP32": fp32,
        "INT8": quantize_onnx(fp32, work / f"{tag}.int8.onnx", batches, cfg, reduce_range),
        "INT8 (stem FP32)": quantize_onnx(
            fp32, work / f"{tag}.fl2.onnx", batches, cfg, reduce_range, float_leading=AUTO_FLOAT_LEADING[0]
        ),
    }, left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="0.22,0.3,0.5")
    ap.add_argument("--round-to", default="8,16,32")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--input-sizes", default=None, help="resolutions inside the model (default: --size only)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from edgetl.backbones import build_backbone
    from edgetl.config import BackboneCfg
    from edgetl.onnx_export import export_onnx
    from edgetl.runner import device_info, interleaved_latency, session

    torch.manual_seed(0)
    base = build_backbone(BackboneCfg(name="torchvision:mobilenet_v2", pretrained=False, input_size=args.size), 10)
    calib = np.random.default_rng(0).standard_normal((64, 3, args.size, args.size)).astype(np.float32)
    feed = {"input": calib[:1]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = {"unpruned FP32": export_onnx(base.model.eval(), base.contract, work / "base.onnx", feed, 17)}
        configs = {}
        sizes = [int(v) for v in args.input_sizes.split(",")] if args.input_sizes else [args.size]
        for px in sizes:
            for target in map(float, args.targets.split(",")):
                for round_to in map(int, args.round_to.split(",")) if target < 1 else [0]:
                    found, left = variants(target, round_to, args.size, work, base, calib, px)
                    configs[(px, target, round_to)] = left
                    paths.update({f"{px}|{target:g}|{round_to}|{k}": p for k, p in found.items()})
                    print(f"{px} px, target {target:g}, round_to {round_to}: {left:.1%} of the MACs", flush=True)
        lat = {}
        for threads in (1, 2):
            lat[threads] = interleaved_latency(
                {n: session(p, threads) for n, p in paths.items()}, feed, runs=args.runs, warmup=20
            )
        ref = {t: lat[t]["unpruned FP32"]["p50_ms"] for t in (1, 2)}
        for (px, target, round_to), left in configs.items():
            names = [f"{px}|{target:g}|{round_to}|{k}" for k in ("FP32", "INT8", "INT8 (stem FP32)")]
            r = {"input_size": px, "target_macs": target, "round_to": round_to, "macs_left": left}
            for n, k in zip(names, ("fp32", "int8", "int8_fl2"), strict=True):
                for t in (1, 2):
                    r[f"{k}_p50_{t}t"] = lat[t][n]["p50_ms"]
                    r[f"{k}_speedup_{t}t"] = ref[t] / lat[t][n]["p50_ms"]
            rows.append(r)
    print(f"\ndevice: {json.dumps(device_info())}; unpruned ORT FP32 p50 {ref[1]:.2f} ms (1t), {ref[2]:.2f} ms (2t)")
    print(
        "| input px | target_macs | round_to | MACs left | pruned FP32 1t (2t) | pruned INT8 1t (2t) "
        "| INT8, stem FP32 1t (2t) | INT8 / pruned FP32 1t |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'{k}_speedup_1t']:.2f}x ({r[f'{k}_speedup_2t']:.2f}x)" for k in ("fp32", "int8", "int8_fl2")]
        best = max(r["int8_speedup_1t"], r["int8_fl2_speedup_1t"]) / r["fp32_speedup_1t"]
        print(
            f"| {r['input_size']} | {r['target_macs']:g} | {r['round_to'] or '-'} | {r['macs_left']:.0%} | "
            + " | ".join(cells)
            + f" | {best:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

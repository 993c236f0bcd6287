"""Where an image bundle's time goes: ORT's per-kernel time summed by operator, its FP32 model vs its shipped INT8.

Both graphs of one bundle (``model.fp32.onnx`` and ``model.onnx``) run with ORT's profiler on the bundle's first
golden image (batch 1, as the device prepares it), interleaved in rounds of 20 runs so that load hits both alike
(ORT profiles a session from its creation, so each round is a fresh session and its first run counts); the table
gives each operator's mean kernel time per run, its share of the graph's kernel time, and the FP32 / INT8 ratio of
the summed groups: Conv (QLinearConv / ConvInteger in INT8), MatMul + Gemm (their quantized forms), Q / DQ, and the
rest by name (a detector's RoiAlign, NonMaxSuppression, TopK ... stay float). The CPU and its int8 features are
printed with it.

    .venv/bin/python benchmarks/op_profile.py artifacts/fasterrcnn_mobilenet_v2_fmnist [--runs 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# an INT8 operator is counted with the float operator it replaces
GROUP = {
    "QLinearConv": "Conv",
    "ConvInteger": "Conv",
    "FusedConv": "Conv",
    "QLinearMatMul": "MatMul / Gemm",
    "MatMulInteger": "MatMul / Gemm",
    "MatMulIntegerToFloat": "MatMul / Gemm",
    "DynamicQuantizeMatMul": "MatMul / Gemm",
    "QGemm": "MatMul / Gemm",
    "MatMul": "MatMul / Gemm",
    "Gemm": "MatMul / Gemm",
    "FusedMatMul": "MatMul / Gemm",
    "FusedGemm": "MatMul / Gemm",
    "QuantizeLinear": "Quantize / Dequantize",
    "DequantizeLinear": "Quantize / Dequantize",
    "DynamicQuantizeLinear": "Quantize / Dequantize",
}


def op_times(sess_opts, path: Path, feed: dict, runs: int, prefix: str) -> tuple[dict, float]:
    """Mean kernel time (us) per run of each operator group in one profiled session, and the graph's total."""
    import onnxruntime as ort

    sess_opts.profile_file_prefix = prefix
    sess = ort.InferenceSession(str(path), sess_opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per[GROUP.get(op, op)] += e["dur"] / runs
    return dict(per), sum(per.values())


def main() -> None:
    import onnxruntime as ort

    from edgetl.runner import Bundle, device_info, normalize, session

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="an image bundle directory (edgetl build --out)")
    ap.add_argument("--runs", type=int, default=200, help="profiled runs per graph, in rounds of 20")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    bundle = Bundle(args.bundle)
    spec = json.loads((args.bundle / "golden.json").read_text())
    a = spec["inputs"]["images"]
    raw = (args.bundle / "golden.bin").read_bytes()
    image = np.frombuffer(raw, np.uint8, int(np.prod(a["shape"][1:])), a["offset"]).reshape(a["shape"][1:])
    feed = {"input": normalize(image[None], bundle.preprocess)}
    graphs = {"FP32": args.bundle / "model.fp32.onnx", "INT8": args.bundle / "model.onnx"}
    for path in graphs.values():  # warm-up, unprofiled
        sess = session(path, args.threads)
        for _ in range(20):
            sess.run(None, feed)

    totals = {name: (defaultdict(float), [0.0]) for name in graphs}
    rounds = max(1, args.runs // 20)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):  # interleaved: FP32 20 runs, INT8 20 runs, and again
            for name, path in graphs.items():
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                opts.enable_profiling = True
                per, total = op_times(opts, path, feed, 20, f"{tmp}/{name}-{r}")
                for op, t in per.items():
                    totals[name][0][op] += t / rounds
                totals[name][1][0] += total / rounds

    fp32, int8 = (totals[n][0] for n in graphs)
    t32, t8 = (totals[n][1][0] for n in graphs)
    print(f"device: {json.dumps(device_info())}")
    print(f"{args.bundle.name}: {args.threads} thread(s), batch 1, {rounds * 20} profiled runs per graph\n")
    print("| operator | FP32 ms | share | INT8 ms | share | FP32/INT8 |")
    print("|---|---|---|---|---|---|")
    for op in sorted(set(fp32) | set(int8), key=lambda o: -max(fp32.get(o, 0), int8.get(o, 0))):
        a32, a8 = fp32.get(op, 0.0) / 1e3, int8.get(op, 0.0) / 1e3
        if max(a32, a8) < 0.005 * max(t32, t8) / 1e3:
            continue  # under half a percent of either graph
        ratio = f"{a32 / a8:.2f}x" if a32 and a8 else "-"
        print(f"| {op} | {a32:.3f} | {1e5 * a32 / t32:.0f}% | {a8:.3f} | {1e5 * a8 / t8:.0f}% | {ratio} |")
    print(f"| all kernels | {t32 / 1e3:.3f} | 100% | {t8 / 1e3:.3f} | 100% | {t32 / t8:.2f}x |")


if __name__ == "__main__":
    main()

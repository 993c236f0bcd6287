"""Where does INT8 gain, and where not? ORT's per-kernel time for every Conv, FP32 vs INT8, grouped by kind.

For each backbone: the FP32 ONNX graph and edgetl's full QDQ INT8 of it (uint8 activations, int8 per-channel
weights, 7-bit without VNNI) run with ORT's profiler at batch 1 (random-initialised weights: kernel time does not
depend on them). Every Conv of the FP32 graph is matched, in execution order, with its QLinearConv in the INT8
graph and classed as stem (3 input channels), depthwise, or pointwise/other. Printed: summed kernel time per class,
the FP32/INT8 ratio and each class's share of the INT8 time; that ceiling bounds what INT8 alone can give
on this CPU, whatever the training does.

A backbone named ``ssdlite:<torchvision backbone>`` is the detection demo's detector (edgetl's SSDLite head over that
trunk, 5 classes), quantized as the build does it: the box / score tail after the last Conv stays float, so "all
kernels" includes that float tail and the head's convs count among depthwise / pointwise.

    .venv/bin/python benchmarks/int8_ops.py [--backbones torchvision:mobilenet_v2,timm:tf_efficientnet_lite0]
                                            [--sizes 96,224] [--runs 300] [--threads 1]
    .venv/bin/python benchmarks/int8_ops.py --backbones ssdlite:torchvision:mobilenet_v2 --sizes 160
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


def conv_kinds(path: Path) -> list[str]:
    """Class of every Conv of the ONNX graph at ``path``, in graph (= execution) order."""
    import onnx

    graph = onnx.load(str(path)).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    kinds = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = shapes[node.input[1]]
        kinds.append("stem" if w[1] * group == 3 else "depthwise" if group > 1 and w[1] == 1 else "pointwise/other")
    return kinds


def kernel_times(path: Path, op: str, feed: dict, runs: int, threads: int) -> tuple[list[float], float]:
    """Mean per-run kernel time (us) of each ``op`` node in execution order, and the total of all nodes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(20):
        sess.run(None, feed)
    sess.end_profiling()  # warm-up not counted: a fresh profile for the measured runs
    opts.profile_file_prefix = str(path.with_suffix("")) + "-m"
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict = {}
    total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        total += e["dur"]
        if e["args"].get("op_name") == op:
            per_node[e["name"]] = per_node.get(e["name"], 0.0) + e["dur"]
    return [v / runs for v in per_node.values()], total / runs


def profile(name: str, size: int, runs: int, threads: int, work: Path) -> dict:
    import torch

    from edgetl.backbones import build_backbone
    from edgetl.compress.ort_quant import quantize_onnx
    from edgetl.config import BackboneCfg, QuantizeCfg
    from edgetl.onnx_export import export_onnx
    from edgetl.runner import cpu_int8_features

    torch.manual_seed(0)
    detector = name.startswith("ssdlite:")
    if detector:
        from edgetl.tasks import create_task

        task = create_task("detection", [f"class{i}" for i in range(5)])
        bb = build_backbone(BackboneCfg(name=name.partition(":")[2], pretrained=False, input_size=size), task)
    else:
        bb = build_backbone(BackboneCfg(name=name, pretrained=False, input_size=size), 10)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, size, size)).astype(np.float32)
    stem = name.replace(":", "_") + f"_{size}"
    fp32 = export_onnx(bb.model.eval(), bb.contract, work / f"{stem}.fp32.onnx", {"input": calib[:1]}, 17)
    int8 = quantize_onnx(
        fp32,
        work / f"{stem}.int8.onnx",
        [{"input": calib[i : i + 16]} for i in (0, 16)],
        QuantizeCfg(float_leading_convs=0),
        reduce_range=not cpu_int8_features()["vnni_or_dot"],
        float_tail=detector,
    )
    feed = {"input": calib[:1]}
    kinds = conv_kinds(fp32)
    t32, total32 = kernel_times(fp32, "Conv", feed, runs, threads)
    t8, total8 = kernel_times(int8, "QLinearConv", feed, runs, threads)
    if not len(kinds) == len(t32) == len(t8):
        raise SystemExit(f"{name}: {len(kinds)} Convs, {len(t32)} FP32 / {len(t8)} INT8 conv kernels profiled")
    out = defaultdict(lambda: [0.0, 0.0, 0])
    for kind, a, b in zip(kinds, t32, t8, strict=True):
        out[kind][0] += a
        out[kind][1] += b
        out[kind][2] += 1
    return {"kinds": dict(out), "total_fp32": total32, "total_int8": total8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="torchvision:mobilenet_v2,timm:tf_efficientnet_lite0")
    ap.add_argument("--sizes", default="96,224")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from edgetl.runner import device_info

    print(f"device: {json.dumps(device_info())}")
    print("| backbone | px | conv kind | convs | FP32 ms | INT8 ms | FP32/INT8 | share of INT8 time |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones.split(","):
            for size in map(int, args.sizes.split(",")):
                r = profile(name, size, args.runs, args.threads, Path(tmp))
                for kind, (a, b, n) in sorted(r["kinds"].items()):
                    print(
                        f"| {name} | {size} | {kind} | {n} | {a / 1e3:.3f} | {b / 1e3:.3f} | {a / b:.2f}x | "
                        f"{b / r['total_int8']:.0%} |",
                        flush=True,
                    )
                a, b = r["total_fp32"], r["total_int8"]
                print(
                    f"| {name} | {size} | all kernels | | {a / 1e3:.3f} | {b / 1e3:.3f} | {a / b:.2f}x | 100% |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""Side-by-side compression benchmark on the demo task (Fashion-MNIST, offline ImageNet weights).

For each backbone: fine-tune once, then branch the pipeline state
  A: export -> quantize (edgetl QAT INT8 of the fine-tuned model)
  B: prune -> distill -> export -> quantize (edgetl pruned + distilled + INT8)
and measure, in one process, test accuracy and batch-1 latency of
  PyTorch eager FP32 | ORT FP32 | ORT default quantize_static (the runtime's own PTQ, default arguments)
  | edgetl QAT INT8 | edgetl pruned + distilled + INT8
All variants are timed interleaved in chunks of 10 runs (noise hits them alike); ratios are p50(ORT FP32) /
p50(variant). 1 thread is the headline, 2 threads beside it.

    .venv/bin/python benchmarks/compression.py [--backbones mobilenet_v2,lite0] [--runs 300] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BACKBONES = {
    "mobilenet_v2": ["backbone.name=torchvision:mobilenet_v2", "backbone.pretrained=IMAGENET1K_V1"],
    "lite0": ["backbone.name=timm:tf_efficientnet_lite0", "backbone.pretrained=true", "finetune.freeze_blocks=4"],
}


def run_stages(state, recipe, names):
    from edgetl.pipeline import _stages

    for name, run, wanted in _stages():
        if name in names and wanted(recipe):
            print(f"[{name}]", flush=True)
            state = run(state, recipe)
    return state


def ort_default_ptq(src: Path, dst: Path, calib: np.ndarray) -> Path:
    """What a user gets from ONNX Runtime alone: quantize_static with its default arguments."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader())
    return dst


def bench_backbone(key: str, runs: int, quick: bool) -> list[dict]:
    import copy

    import torch

    from edgetl.config import load_recipe
    from edgetl.pipeline import State
    from edgetl.runner import feed_for, interleaved_latency, normalize, session

    overrides = list(BACKBONES[key])
    if quick:
        overrides += ["data.max_train=1500", "finetune.epochs=2", "distill.epochs=1"]
    recipe = load_recipe(ROOT / "models" / "mobilenet_v2_fmnist.yaml", overrides)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{key}-"))
    torch.manual_seed(recipe.seed)
    base = run_stages(State(recipe=recipe, workdir=work / "base"), recipe, {"load", "finetune"})
    (work / "a").mkdir()
    (work / "b").mkdir()
    fp32_model = copy.deepcopy(base.backbone.model)
    state_a = base.replace(workdir=work / "a", backbone=copy.copy(base.backbone))
    state_a.backbone.model = copy.deepcopy(fp32_model)
    state_a = run_stages(state_a, recipe, {"export", "quantize"})
    state_b = base.replace(workdir=work / "b", backbone=copy.copy(base.backbone))
    state_b.backbone.model = copy.deepcopy(fp32_model)
    state_b = run_stages(state_b, recipe, {"prune", "distill", "export", "quantize"})

    pre = base.backbone.contract.preprocess
    x_test = normalize(base.data.test.images, pre)
    y_test = base.data.test.labels
    calib = normalize(base.data.train.images[:256], pre)
    fp32_path = work / "a" / "model.fp32.onnx"
    chosen_a = state_a.metrics["quantize"]["chosen"] or "fp32"
    chosen_b = state_b.metrics["quantize"]["chosen"] or "distilled"
    variants = {
        "ORT FP32": fp32_path,
        "ORT quantize_static (defaults)": ort_default_ptq(fp32_path, work / "ort_default.onnx", calib),
        f"edgetl INT8 ({chosen_a})": work / "a" / state_a.onnx[chosen_a],
        f"edgetl pruned+distilled+INT8 ({chosen_b})": work / "b" / state_b.onnx[chosen_b],
    }

    def ort_acc(path):
        sess = session(path, threads=2)
        preds = np.concatenate([sess.run(None, {"input": x_test[i : i + 64]})[0].argmax(-1)
                                for i in range(0, len(x_test), 64)])
        return 100.0 * float((preds == y_test).mean())

    with torch.inference_mode():
        torch_acc = 100.0 * float((torch.cat([fp32_model(torch.from_numpy(x_test[i : i + 64]))
                                              for i in range(0, len(x_test), 64)]).argmax(-1).numpy() == y_test).mean())
    acc = {"PyTorch eager FP32": torch_acc, **{name: ort_acc(p) for name, p in variants.items()}}

    class TorchSession:
        """PyTorch eager timed through the same interleaved loop as the ORT sessions."""

        def __init__(self, model):
            self.model = model

        def run(self, _outputs, feed):
            with torch.inference_mode():
                return [self.model(torch.from_numpy(feed["input"])).numpy()]

    rows = {name: {"backbone": key, "variant": name, "acc": a, "size_mb": None} for name, a in acc.items()}
    for name, p in variants.items():
        rows[name]["size_mb"] = p.stat().st_size / 1e6
    for threads in (1, 2):
        torch.set_num_threads(threads)
        sessions = {"PyTorch eager FP32": TorchSession(fp32_model.eval()),
                    **{name: session(p, threads=threads) for name, p in variants.items()}}
        lat = interleaved_latency(sessions, feed_for(sessions["ORT FP32"], 1), runs=runs, warmup=20)
        for name in sessions:
            rows[name][f"p50_ms_{threads}t"] = lat[name]["p50_ms"]
            rows[name][f"speedup_{threads}t"] = lat["ORT FP32"]["p50_ms"] / lat[name]["p50_ms"]
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="mobilenet_v2,lite0")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="fewer images and epochs (smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    from edgetl.runner import device_info

    t0 = time.time()
    rows = []
    for key in args.backbones.split(","):
        rows += bench_backbone(key, args.runs, args.quick)
    print(f"\ndevice: {json.dumps(device_info())}  ({time.time() - t0:.0f} s)")
    print("| backbone | variant | test acc | Δacc vs ORT FP32 | p50 1 thread | speedup 1t | p50 2 threads | "
          "speedup 2t | size MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["backbone"] == r["backbone"] and x["variant"] == "ORT FP32")
        size = f"{r['size_mb']:.2f}" if r["size_mb"] else "-"
        print(f"| {r['backbone']} | {r['variant']} | {r['acc']:.1f}% | {r['acc'] - ref['acc']:+.1f} | "
              f"{r['p50_ms_1t']:.2f} ms | {r['speedup_1t']:.2f}x | {r['p50_ms_2t']:.2f} ms | {r['speedup_2t']:.2f}x | "
              f"{size} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

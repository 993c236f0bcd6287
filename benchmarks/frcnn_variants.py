"""Faster R-CNN's speed and mAP knobs, measured on the demo's own model (``make demo-detect-frcnn`` first).

``proposals``: the fine-tuned model from the stage cache (the recipe's load + finetune, restored), its RPN's
inference top-n set to each count before export; ORT FP32 mAP on validation and test, p50 at 1 thread (batch 1,
interleaved runs). Training does not depend on the count, so one fine-tune serves every row.
``int8``: the bundle's FP32 graph quantized as the build does (the shipped placement's leading FP32 convs, the tail
float) and in variants: the box head's MatMuls left float, 4x the calibration images; mAP on validation and test,
p50 of the FP32 graph and of each variant, interleaved.

    .venv/bin/python benchmarks/frcnn_variants.py proposals [--recipe models/fasterrcnn_mobilenet_v2_fmnist.yaml]
    .venv/bin/python benchmarks/frcnn_variants.py int8 [--bundle artifacts/fasterrcnn_mobilenet_v2_fmnist]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def proposals(recipe_path: Path, counts: list[int], runs: int) -> dict:
    from edgetl.cache import open_cache
    from edgetl.config import load_recipe
    from edgetl.onnx_export import export_onnx
    from edgetl.pipeline import run_stages

    recipe = load_recipe(recipe_path)
    work = Path(tempfile.mkdtemp(prefix="bench-frcnn-"))
    state = run_stages(recipe, work, open_cache(), until="finetune")
    model, feed = state.backbone.model.eval(), state.modality.latency_feed(state.data.test)
    paths = {}
    for n in counts:
        model.det.rpn._pre_nms_top_n["testing"] = model.det.rpn._post_nms_top_n["testing"] = n
        paths[f"{n} proposals"] = export_onnx(model, state.backbone.contract, work / f"p{n}.onnx", feed, 17)
    return measure(state, paths, runs)


def int8(bundle: Path, runs: int) -> dict:
    import yaml

    from edgetl.compress.ort_quant import quantize_onnx
    from edgetl.config import QuantizeCfg, recipe_from_dict
    from edgetl.stages import load
    from edgetl.state import State

    recipe = recipe_from_dict(yaml.safe_load((bundle / "recipe.lock.yaml").read_text())["recipe"])
    work = Path(tempfile.mkdtemp(prefix="bench-frcnn-"))
    state = load.run(State(recipe=recipe, workdir=work), recipe)
    n = recipe.quantize.calibration_size
    calib = state.modality.calibration(state.data.train, n)
    shipped = json.loads((bundle / "report.json").read_text())["metrics"]["quantize"]["chosen"]
    fl = int(m.group(1)) if (m := re.search(r"_fl(\d+)", shipped)) else 0
    fp32 = bundle / "model.fp32.onnx"

    def q(name: str, feeds, ops=None):
        return quantize_onnx(fp32, work / name, feeds, QuantizeCfg(), False, ops, float_leading=fl, float_tail=True)

    paths = {
        "FP32": fp32,
        f"INT8 as the build ({n} calibration images, {fl} FP32 convs)": q("a.onnx", calib),
        "INT8, box head's MatMuls float": q("b.onnx", calib, ("Conv",)),
        f"INT8, {4 * n} calibration images": q("c.onnx", state.modality.calibration(state.data.train, 4 * n)),
    }
    return measure(state, paths, runs)


def measure(state, paths: dict, runs: int) -> dict:
    from edgetl.measure import ort_metric
    from edgetl.runner import interleaved_latency, session

    mod, task = state.modality, state.task
    rows = {
        name: {
            "val": ort_metric(task, p, mod.feeds(state.data.val), mod.targets(state.data.val)).value,
            "test": ort_metric(task, p, mod.feeds(state.data.test), mod.targets(state.data.test)).value,
        }
        for name, p in paths.items()
    }
    lat = interleaved_latency({k: session(p, 1) for k, p in paths.items()}, mod.latency_feed(state.data.test), runs, 10)
    for name in rows:
        rows[name]["p50_ms"] = lat[name]["p50_ms"]
    return rows


def main() -> None:
    from edgetl.runner import device_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("proposals", "int8"))
    ap.add_argument("--recipe", type=Path, default=ROOT / "models" / "fasterrcnn_mobilenet_v2_fmnist.yaml")
    ap.add_argument("--bundle", type=Path, default=ROOT / "artifacts" / "fasterrcnn_mobilenet_v2_fmnist")
    ap.add_argument("--counts", default="150,100,50,25")
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    if args.what == "proposals":
        rows = proposals(args.recipe, [int(c) for c in args.counts.split(",")], args.runs)
    else:
        rows = int8(args.bundle, args.runs)
    print(f"\ndevice: {json.dumps(device_info())}")
    print("| variant | val mAP | test mAP | p50 1 thread |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['val']:.2f} | {r['test']:.2f} | {r['p50_ms']:.2f} ms |")


if __name__ == "__main__":
    main()

"""Write the bundle: the shipped ONNX model and everything a device or app needs beside it.

model.onnx          the model to ship (INT8 when a compression stage produced one, else FP32)
model.fp32.onnx     the fine-tuned FP32 reference, when model.onnx is another model (INT8, pruned, distilled)
labels.json         class names in output order
preprocess.json     resize / crop / mean / std the runner applies
recipe.lock.yaml    the resolved recipe and library versions
report.json         per-model measurements, training history, gates, machine
report.html         the same as one self-contained page with plots (no network needed to view it)
model.ort           ONNX Runtime Mobile format of model.onnx, when export.ort_format is true
model.fp16.onnx     the newest float model in FP16 for GPU execution providers, when export.fp16 is true
tokenizer.json      text bundles: the backbone's tokenizer (the runner uses it with `tokenizers`)
runner.py           the device-side runner (onnxruntime + numpy + Pillow or tokenizers only)
manifest.json       sha256 of every file above
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from edgetl import __version__
from edgetl.config import Recipe, recipe_to_dict
from edgetl.measure import onnx_metadata
from edgetl.report import versions, write_html, write_report
from edgetl.runner import FORMAT, FORMAT_VERSION, GOLDEN, MANIFEST, decoder_path, model_files, sha256
from edgetl.state import FLOAT_ROLES, State, shipped_role

GOLDEN_BYTES = 512 * 1024  # the golden set's inputs and outputs stay under this (1 to 32 examples)
INT8_DEVICE_SLACK = 0.05  # INT8 outputs may differ by this fraction of their range on other CPUs' int8 kernels
REFERENCE = (
    "model.fp32.onnx",
    "report.json",
    "report.html",
    "recipe.lock.yaml",
    "runner.py",
    GOLDEN,
    "golden.bin",
    "model.ort",
    "model.fp16.onnx",
)  # listed and checked when present, not needed to run: a device copy may leave them out


def write_golden(state: State, recipe: Recipe, model: Path, int8: bool) -> dict:
    """golden.json + golden.bin: up to 32 validation inputs as the device prepares them (images: uint8 after resize
    and crop; texts: token ids) and the shipped model's outputs on them, for ``runner.py verify`` on the device."""
    import numpy as np

    from edgetl.measure import ort_outputs

    arrays, feed = state.modality.golden(state.data.val, 32, GOLDEN_BYTES)
    outputs = ort_outputs(model, [feed])[0]
    tokens = np.issubdtype(outputs.dtype, np.integer)  # generated ids (seq2seq): compared exactly, per output
    outputs = outputs.astype(np.float32)
    each = (outputs.nbytes + sum(a.nbytes for a in arrays.values())) / len(outputs)
    k = max(1, min(len(outputs), int(GOLDEN_BYTES // each)))  # inputs + outputs under GOLDEN_BYTES
    arrays, outputs = {name: a[:k] for name, a in arrays.items()}, outputs[:k]
    # per-token outputs are compared on real tokens only: what a model gives at padding is not specified
    positions = "attention_mask" if outputs.ndim == 3 and "attention_mask" in arrays else None
    # (initial 0: a detector that found no box on any golden image gives no values)
    scale = float(np.abs(outputs if positions is None else outputs[arrays[positions].astype(bool)]).max(initial=0.0))
    atol = recipe.export.atol if recipe.export.atol is not None else state.backbone.contract.atol
    tolerance = atol + recipe.export.rtol * scale + (INT8_DEVICE_SLACK * scale if int8 else 0.0)
    if tokens:  # the share of differing tokens may reach this; the share of identical outputs is the gate
        tolerance = 1.0 - recipe.export.min_agreement
    layout, blob = {}, b""
    for name, a in [*arrays.items(), ("_outputs", outputs)]:
        a = np.ascontiguousarray(a)
        layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": len(blob)}
        blob += a.tobytes()
    (state.workdir / "golden.bin").write_bytes(blob)
    spec = {
        "model": model.name,
        "data": "golden.bin",
        "inputs": {name: layout[name] for name in arrays},
        "outputs": layout["_outputs"],  # the shipped model's first output, float32, in golden.bin
        "positions": positions,  # an input whose nonzero entries mark the compared positions (None: all)
        # token ids: equal or not; values: within the tolerance; detections: matched boxes within the tolerance
        "compare": "tokens" if tokens else getattr(state.task, "golden_compare", "values"),
        "tolerance": tolerance,
        "min_agreement": recipe.export.min_agreement,
    }
    if spec["compare"] == "detections":  # matched boxes as the export's parity compares them (runner.detection_diff)
        from edgetl.runner import BOX_SLACK, DIFF_MIN_SCORE

        spec.update(min_score=DIFF_MIN_SCORE, relative=True, tolerance=atol + BOX_SLACK)
    (state.workdir / GOLDEN).write_text(json.dumps(spec))
    return {"n": len(outputs), "tolerance": spec["tolerance"], "bytes": len(blob)}


def write_manifest(root: Path) -> dict:
    files = {
        p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgetl": __version__,
        "files": files,
        "reference": [name for name in REFERENCE if name in files],
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def run(state: State, recipe: Recipe) -> State:
    """Rename the shipped model to model.onnx, keep model.fp32.onnx beside it, drop intermediate files."""
    out = state.workdir
    onnx = dict(state.onnx)
    shipped = shipped_role(state)
    if shipped is not None:
        if decoder_path(out / onnx[shipped]).is_file():  # seq2seq: its decoder goes with it
            os.replace(decoder_path(out / onnx[shipped]), decoder_path(out / "model.onnx"))
        os.replace(out / onnx[shipped], out / "model.onnx")
        for role, name in onnx.items():
            if role not in (shipped, "fp32"):
                for f in model_files(out / name):
                    f.unlink(missing_ok=True)
        for row in state.rows:
            row["in_bundle"] = row["stage"] in (shipped, "fp32")
            if row["stage"] == shipped:
                row["file"] = "model.onnx"
        onnx = {shipped: "model.onnx", **({"fp32": onnx["fp32"]} if "fp32" in onnx and shipped != "fp32" else {})}
    golden = write_golden(state, recipe, out / "model.onnx", int8=shipped not in FLOAT_ROLES)
    bundle = {"shipped": shipped, "files": onnx, "golden": golden}
    state = state.replace(onnx=onnx, metrics={**state.metrics, "bundle": bundle})
    (out / "labels.json").write_text(json.dumps(state.data.classes, indent=2))
    pre = {**state.modality.bundle_preprocess(recipe.data), "task": state.task.name}  # the runner post-processes
    # what the runtime decodes with (a CRF's scores, a detector's anchors), for runtimes that do not read ONNX
    # metadata (Node): preprocess.json names each file
    for key, (name, text) in state.task.bundle_files(onnx_metadata(out / "model.onnx")).items():
        (out / name).write_text(text)
        pre[key] = name
    (out / "preprocess.json").write_text(json.dumps(pre, indent=2))
    lock = {"recipe": recipe_to_dict(recipe), "versions": versions()}
    (out / "recipe.lock.yaml").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.copyfile(Path(__file__).resolve().parent.parent / "runner.py", out / "runner.py")
    if state.backbone.tokenizer_file is not None:
        shutil.copyfile(state.backbone.tokenizer_file, out / "tokenizer.json")
    write_report(state)
    write_html(out)
    write_manifest(out)
    return state

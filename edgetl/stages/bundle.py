"""Write the bundle: the shipped ONNX model and everything a device or app needs beside it.

model.onnx          the model to ship (INT8 when a compression stage produced one, else FP32)
model.fp32.onnx     the fine-tuned FP32 reference, when model.onnx is another model (INT8, pruned, distilled)
labels.json         class names in output order
preprocess.json     resize / crop / mean / std the runner applies
recipe.lock.yaml    the resolved recipe and library versions
report.json         per-model measurements, training history, gates, machine
report.html         the same as one self-contained page with plots (no network needed to view it)
model.ort           ONNX Runtime Mobile format of model.onnx, when export.ort_format is true
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
from edgetl.report import versions, write_html, write_report
from edgetl.runner import FORMAT, FORMAT_VERSION, MANIFEST, sha256
from edgetl.state import State, shipped_role


def write_manifest(root: Path) -> dict:
    files = {
        p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "edgetl": __version__, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def run(state: State, recipe: Recipe) -> State:
    """Rename the shipped model to model.onnx, keep model.fp32.onnx beside it, drop intermediate files."""
    out = state.workdir
    onnx = dict(state.onnx)
    shipped = shipped_role(state)
    if shipped is not None:
        os.replace(out / onnx[shipped], out / "model.onnx")
        for role, name in onnx.items():
            if role not in (shipped, "fp32"):
                (out / name).unlink(missing_ok=True)
        for row in state.rows:
            row["in_bundle"] = row["stage"] in (shipped, "fp32")
            if row["stage"] == shipped:
                row["file"] = "model.onnx"
        onnx = {shipped: "model.onnx", **({"fp32": onnx["fp32"]} if "fp32" in onnx and shipped != "fp32" else {})}
    state = state.replace(onnx=onnx, metrics={**state.metrics, "bundle": {"shipped": shipped, "files": onnx}})
    (out / "labels.json").write_text(json.dumps(state.data.classes, indent=2))
    (out / "preprocess.json").write_text(json.dumps(state.modality.bundle_preprocess(recipe.data), indent=2))
    lock = {"recipe": recipe_to_dict(recipe), "versions": versions()}
    (out / "recipe.lock.yaml").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.copyfile(Path(__file__).resolve().parent.parent / "runner.py", out / "runner.py")
    if state.backbone.tokenizer_file is not None:
        shutil.copyfile(state.backbone.tokenizer_file, out / "tokenizer.json")
    write_report(state)
    write_html(out)
    write_manifest(out)
    return state

"""Export the current model to FP32 ONNX and prove ORT computes what PyTorch computes.

TorchScript exporter (``dynamo=False``), opset from the recipe, dynamic batch axis from the backbone's
contract; ``onnx.checker`` on the result; then ORT is run on real validation images and must agree with
PyTorch within the contract's tolerance (max |difference| of logits) and on top-1. Labels and preprocessing
are also written into the ONNX metadata so the file alone is enough for an app.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from edgetl.config import Recipe
from edgetl.errors import EdgetlError
from edgetl.pipeline import State


def export_onnx(model, contract, path: Path, sample, opset: int, metadata: dict | None = None) -> Path:
    """Write ``model`` to ``path`` as ONNX following ``contract``; returns the path."""
    import onnx
    import torch

    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice is not the user's problem
        torch.onnx.export(model, (sample,), str(path), dynamo=False, opset_version=opset,
                          input_names=list(contract.input_names), output_names=list(contract.output_names),
                          dynamic_axes=contract.dynamic_axes, do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    if metadata:
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.save(proto, str(path))
    return path


def parity(model, onnx_path: Path, inputs: np.ndarray, batch: int = 32) -> dict:
    """max |ORT - PyTorch| over logits and top-1 agreement on ``inputs`` (float32 NCHW)."""
    import torch

    from edgetl.runner import session

    sess = session(onnx_path, threads=2)
    name = sess.get_inputs()[0].name
    diffs, agree = [], 0
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            x = inputs[i : i + batch]
            ref = model(torch.from_numpy(x)).numpy()
            got = sess.run(None, {name: x})[0]
            diffs.append(float(np.abs(ref - got).max()))
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
    return {"max_abs_diff": max(diffs), "top1_agreement": agree / len(inputs), "n": len(inputs)}


def val_inputs(state: State, n: int = 256) -> np.ndarray:
    from edgetl.runner import normalize

    return normalize(state.data.val.images[:n], state.backbone.contract.preprocess)


def bundle_metadata(state: State) -> dict:
    return {"edgetl.labels": state.data.classes, "edgetl.preprocess": state.backbone.contract.preprocess,
            "edgetl.recipe": state.recipe.name}


def run(state: State, recipe: Recipe) -> State:
    """Export every float model the pipeline kept (fine-tuned, pruned, distilled) and check each one."""
    import torch

    cfg = recipe.export
    if cfg.opset < 17:
        raise EdgetlError("export.opset must be 17 or newer")
    contract = state.backbone.contract
    atol = cfg.atol if cfg.atol is not None else contract.atol
    inputs = val_inputs(state)
    models = state.models or {"fp32": state.backbone.model}
    onnx, checks = dict(state.onnx), {}
    for role, model in models.items():
        path = state.workdir / f"model.{role}.onnx"
        export_onnx(model.eval(), contract, path, torch.from_numpy(inputs[:1]), cfg.opset, bundle_metadata(state))
        check = parity(model, path, inputs)
        print(f"  {role}: ORT vs PyTorch max|diff| {check['max_abs_diff']:.2e} (atol {atol:g}), "
              f"top-1 agreement {100 * check['top1_agreement']:.2f}% on {check['n']} validation images")
        if check["max_abs_diff"] > atol or check["top1_agreement"] < cfg.min_top1_agreement:
            raise EdgetlError(
                f"ONNX export of the {role} model does not match PyTorch: max|diff| {check['max_abs_diff']:.3g} "
                f"(atol {atol:g}), top-1 agreement {100 * check['top1_agreement']:.1f}% "
                f"(need {100 * cfg.min_top1_agreement:.1f}%)"
            )
        onnx[role], checks[role] = path.name, {**check, "atol": atol}
    return state.replace(onnx=onnx, models=models, metrics={**state.metrics, "export": {"opset": cfg.opset, **checks}})

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


def export_onnx(model, contract, path: Path, sample: dict, opset: int, metadata: dict | None = None) -> Path:
    """Write ``model`` to ``path`` as ONNX following ``contract``; ``sample`` is one ONNX-style feed."""
    import onnx

    model.eval()
    exported = contract.exporter == "optimum" and _optimum_export(model, path, opset)
    if not exported:
        _torch_export(model, contract, path, sample, opset)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    if metadata:
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.save(proto, str(path))
    return path


def _torch_export(model, contract, path: Path, sample: dict, opset: int) -> None:
    import torch

    args = tuple(torch.from_numpy(sample[name]) for name in contract.input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice is not the user's problem
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(contract.input_names), output_names=list(contract.output_names),
                          dynamic_axes=contract.dynamic_axes, do_constant_folding=True)


def _optimum_export(wrapper, path: Path, opset: int) -> bool:
    """optimum's exporter for the wrapped transformers model (its ONNX config names the inputs and axes);
    False where optimum is missing or has no config for the architecture, so torch.onnx.export takes over."""
    import shutil
    import tempfile

    try:
        from optimum.exporters.onnx import onnx_export_from_model
    except ImportError:
        return False
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_export_from_model(wrapper.model, tmp, opset=opset, task="text-classification", do_validation=False)
        except (ValueError, KeyError, NotImplementedError):
            return False
        shutil.move(str(Path(tmp) / "model.onnx"), str(path))
    return True


def parity(model, onnx_path: Path, batches: list[dict]) -> dict:
    """max |ORT - PyTorch| over logits and top-1 agreement on ONNX-style ``batches``."""
    import torch

    from edgetl.data import torch_forward
    from edgetl.runner import session

    sess = session(onnx_path, threads=2)
    diffs, agree, n = [], 0, 0
    with torch.inference_mode():
        for feed in batches:
            ref = torch_forward(model, feed).numpy()
            got = sess.run(None, feed)[0]
            diffs.append(float(np.abs(ref - got).max()))
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            n += len(ref)
    return {"max_abs_diff": max(diffs), "top1_agreement": agree / n, "n": n}


def parity_feeds(state: State) -> list[dict]:
    """Real validation inputs; for text also batch 1 (no padding) and full max_length padding."""
    from edgetl.data import feeds

    pre, tok, val = state.backbone.contract.preprocess, state.tokenizer, state.data.val
    if pre.get("kind") != "text":
        return feeds(val, pre, limit=256, batch=32)
    return (feeds(val, pre, tok, batch=32, limit=128) + feeds(val, pre, tok, batch=1, limit=4)
            + feeds(val, pre, tok, batch=8, limit=16, pad_to=pre["max_length"]))


def bundle_metadata(state: State) -> dict:
    return {"edgetl.labels": state.data.classes, "edgetl.preprocess": state.backbone.contract.preprocess,
            "edgetl.recipe": state.recipe.name}


def run(state: State, recipe: Recipe) -> State:
    """Export every float model the pipeline kept (fine-tuned, pruned, distilled) and check each one."""

    cfg = recipe.export
    contract = state.backbone.contract
    atol = cfg.atol if cfg.atol is not None else contract.atol
    batches = parity_feeds(state)
    models = state.models or {"fp32": state.backbone.model}
    onnx, checks = dict(state.onnx), {}
    for role, model in models.items():
        path = state.workdir / f"model.{role}.onnx"
        export_onnx(model.eval(), contract, path, batches[0], cfg.opset, bundle_metadata(state))
        check = parity(model, path, batches)
        print(f"  {role}: ORT vs PyTorch max|diff| {check['max_abs_diff']:.2e} (atol {atol:g}), "
              f"top-1 agreement {100 * check['top1_agreement']:.2f}% on {check['n']} validation inputs")
        if check["max_abs_diff"] > atol or check["top1_agreement"] < cfg.min_top1_agreement:
            raise EdgetlError(
                f"ONNX export of the {role} model does not match PyTorch: max|diff| {check['max_abs_diff']:.3g} "
                f"(atol {atol:g}), top-1 agreement {100 * check['top1_agreement']:.1f}% "
                f"(need {100 * cfg.min_top1_agreement:.1f}%)"
            )
        onnx[role], checks[role] = path.name, {**check, "atol": atol}
    return state.replace(onnx=onnx, models=models, metrics={**state.metrics, "export": {"opset": cfg.opset, **checks}})

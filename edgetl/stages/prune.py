"""Structured pruning with Torch-Pruning (DepGraph): channels are physically removed, not masked.

Every coupled layer (a conv, its BatchNorm, the depthwise conv and the next conv's inputs, residual partners)
shrinks together, so the exported ONNX graph has smaller tensors and ONNX Runtime does less work. Pruning
runs in ``steps`` increments with a short recovery fine-tune after each. The stem's input and the classifier's
output are protected; they are looked up on the model being pruned (a copy made earlier would leave the real
classifier unprotected).
"""

from __future__ import annotations

import copy

from edgetl.config import PruneCfg, Recipe
from edgetl.data import make_loader
from edgetl.errors import EdgetlError
from edgetl.pipeline import State
from edgetl.train import fit


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


def make_pruner(model, example, cfg: PruneCfg, head: str):
    import torch_pruning as tp

    if not 0.0 < cfg.ratio < 1.0:
        raise EdgetlError("prune.ratio must be between 0 and 1")
    return tp.pruner.MetaPruner(
        model, example, importance=_importance(cfg.importance), pruning_ratio=cfg.ratio,
        iterative_steps=max(cfg.steps, 1), ignored_layers=protected_layers(model, head, cfg.protect),
        round_to=cfg.round_to,
    )


def prune_step(pruner, model, example, loader=None) -> None:
    """One pruning step; Taylor importance needs gradients from a batch first."""
    import torch

    if "Taylor" in type(pruner.importance).__name__ and loader is not None:
        model.zero_grad()
        x, y = next(iter(loader))
        torch.nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)


def run(state: State, recipe: Recipe) -> State:
    import torch

    from edgetl.stages.verify import count_params_macs

    cfg = recipe.prune
    if state.tokenizer is not None:
        raise EdgetlError("prune: attention-head / FFN pruning of text backbones is not supported yet; "
                          "remove the prune section (distill and quantize work)")
    model = state.backbone.model
    pre = state.backbone.contract.preprocess
    size = pre["crop"]
    example = torch.randn(1, 3, size, size)
    params0, macs0 = count_params_macs(model, size)
    train = make_loader(state.data.train, pre, recipe.data.batch_size, augment=recipe.data.augment, shuffle=True,
                        seed=recipe.seed + 10)
    val = make_loader(state.data.val, pre, recipe.data.batch_size)
    for p in model.parameters():
        p.requires_grad_(True)
    pruner = make_pruner(model, example, cfg, state.backbone.head)
    history, steps = [], []
    for step in range(max(cfg.steps, 1)):
        model.eval()
        prune_step(pruner, model, example, train)
        params, macs = count_params_macs(model, size)
        steps.append({"step": step + 1, "params": params, "macs": macs})
        print(f"  step {step + 1}/{cfg.steps}: params {params / 1e6:.2f}M ({100 * params / params0:.0f}%), "
              f"MACs {macs / 1e6:.1f}M ({100 * macs / macs0:.0f}%)")
        if cfg.recovery_epochs > 0:
            history += fit(model, train, val, epochs=cfg.recovery_epochs, lr=cfg.lr, warmup_epochs=0.0,
                           label_smoothing=recipe.finetune.label_smoothing if recipe.finetune else 0.0,
                           desc=f"prune recovery {step + 1}/{cfg.steps}")
        if cfg.target_macs is not None and macs <= cfg.target_macs * macs0:
            break
    model.eval()
    with torch.no_grad():
        out = model(example)
    if out.shape[-1] != len(state.data.classes):
        raise EdgetlError("pruning changed the number of classes; keep 'head' in prune.protect")
    metrics = {"params_before": params0, "macs_before": macs0, "params_after": steps[-1]["params"],
               "macs_after": steps[-1]["macs"], "steps": steps}
    return state.replace(history={**state.history, "prune": history}, metrics={**state.metrics, "prune": metrics},
                         models={**state.models, "pruned": copy.deepcopy(model).eval()})

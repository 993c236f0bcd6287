"""Transfer learning: train the new head and as much of the pretrained backbone as the strategy says.

Strategies (``finetune.strategy``), all through ``train.fit``:

- ``linear_probe``: backbone frozen; its features are computed once, cached, and only the head is trained.
- ``freeze``: the first ``freeze_blocks`` blocks stay frozen (and their BatchNorm statistics), the rest train.
- ``full``: everything trains; block k from the top at ``lr * lr_decay**k`` (discriminative / layer-wise LR).
- ``gradual_unfreeze``: starts with the head only; every ``unfreeze_every`` epochs the next ``unfreeze_group``
  blocks from the top join, each at its layer-wise LR.
"""

from __future__ import annotations

import copy
import dataclasses

from edgetl.backbones import replace_module
from edgetl.config import FinetuneCfg, Recipe
from edgetl.errors import EdgetlError
from edgetl.state import State
from edgetl.train import TaskLoss, best, call, evaluate, fit


def param_groups(backbone, cfg: FinetuneCfg) -> tuple[list[dict], callable]:
    """AdamW groups with layer-wise LRs, and the epoch hook that sets ``requires_grad`` per strategy."""
    model = backbone.model
    params = dict(model.named_parameters())
    blocks = backbone.blocks
    n = len(blocks)
    head = [p for name, p in params.items() if name.startswith(backbone.head + ".")]
    groups = [{"params": head, "lr": cfg.lr}]
    if backbone.extra:  # a CRF beside the head: trained from the start, at its own LR
        head = head + [params[k] for k in backbone.extra]
        groups.append({"params": [params[k] for k in backbone.extra], "lr": cfg.lr * backbone.extra_lr_scale})
    for i, names in enumerate(blocks):
        groups.append({"params": [params[k] for k in names], "lr": cfg.lr * cfg.lr_decay ** (n - i)})

    if cfg.strategy == "freeze" and not 0 <= cfg.freeze_blocks <= n:
        raise EdgetlError(f"finetune.freeze_blocks must be between 0 and {n} for this backbone (it has {n} blocks)")

    def trainable_blocks(epoch: int) -> int:
        """How many blocks, counted from the input, are trainable at this epoch."""
        if cfg.strategy == "full":
            return n
        if cfg.strategy == "freeze":
            return n - cfg.freeze_blocks
        if cfg.strategy == "gradual_unfreeze":
            return min(n, (epoch // max(cfg.unfreeze_every, 1)) * cfg.unfreeze_group)
        return 0

    def on_epoch_start(epoch: int) -> None:
        k = trainable_blocks(epoch)
        for i, names in enumerate(blocks):
            for name in names:
                params[name].requires_grad_(i >= n - k)
        for p in head:
            p.requires_grad_(True)

    on_epoch_start(0)
    return groups, on_epoch_start


def _linear_probe(state: State, cfg: FinetuneCfg, bs: int) -> list[dict]:
    """Cache backbone features once (no augmentation), then train only the head on them."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    model = state.backbone.model
    head_name = state.backbone.head
    head = model.get_submodule(head_name)
    for p in model.parameters():
        p.requires_grad_(False)
    replace_module(model, head_name, torch.nn.Identity())
    try:
        model.eval()
        feats = {}
        with torch.inference_mode():
            for split in ("train", "val"):
                loader = state.modality.loader(getattr(state.data, split), bs)
                labels = torch.as_tensor(getattr(state.data, split).labels)
                feats[split] = torch.cat([call(model, x) for x, _ in loader]), labels
    finally:
        replace_module(model, head_name, head)
    for p in head.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(state.recipe.seed)
    train = DataLoader(TensorDataset(*feats["train"]), batch_size=bs, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(*feats["val"]), batch_size=bs)
    return fit(
        head,
        train,
        val,
        task=state.task,
        objective=TaskLoss(state.task, cfg.label_smoothing),
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_epochs=cfg.warmup_epochs,
        patience=cfg.patience,
        desc="finetune (linear probe)",
        train=state.recipe.train,
    )


def run(state: State, recipe: Recipe) -> State:
    cfg = recipe.finetune
    bs = recipe.data.batch_size
    model, mod, task = state.backbone.model, state.modality, state.task
    advice = None
    if cfg.strategy == "auto":  # the scenario table, measured on this data (edgetl/advise.py)
        from edgetl.advise import advise, apply

        advice = advise(state)
        cfg = apply(cfg, advice)
        print(f"  strategy auto: {advice.describe()}")
    if cfg.strategy == "linear_probe":
        history = _linear_probe(state, cfg, bs)
    else:
        groups, hook = param_groups(state.backbone, cfg)
        train = mod.loader(state.data.train, bs, augment=recipe.data.augment, shuffle=True, seed=recipe.seed)
        val = mod.loader(state.data.val, bs)
        history = fit(
            model,
            train,
            val,
            task=task,
            objective=TaskLoss(task, cfg.label_smoothing),
            param_groups=groups,
            epochs=cfg.epochs,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_epochs=cfg.warmup_epochs,
            patience=cfg.patience,
            on_epoch_start=hook,
            desc=f"finetune ({cfg.strategy})",
            train=recipe.train,
        )
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    test = evaluate(model, mod.loader(state.data.test, bs), task)["metric"]
    print(f"  fine-tuned: val {best(history, task):.2f}  test {test}")
    teacher = copy.deepcopy(model).eval()
    return state.replace(
        teacher=teacher,
        reference=test,
        models={**state.models, "fp32": teacher},
        history={**state.history, "finetune": history},
        metrics={
            **state.metrics,
            "finetune": {
                "metric": test.name,
                "test_metric": test.value,
                "strategy": cfg.strategy,
                **({"advice": {**dataclasses.asdict(advice), "text": advice.describe()}} if advice else {}),
            },
        },
    )

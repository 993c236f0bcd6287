"""Knowledge distillation: the fine-tuned FP32 model (before pruning) teaches the current, smaller model.

The objective is the task's distillation loss (classification: alpha * T^2 * KL(student_T || teacher_T) +
(1 - alpha) * cross-entropy) plus optionally ``feature_weight`` * MSE between intermediate features (transformers:
every layer's hidden states, which head/FFN pruning leaves the same width; CNNs: the head's input through a learned
projection), through the same ``fit`` loop as fine-tuning (``train.Distill`` is an objective, not a second trainer).
The report shows the metric before and after, so the recovery from pruning is visible.

``transfer_size`` > 0 distils on a larger transfer set: the training split plus that many examples drawn from
the training-pool examples that ``data.max_train`` left out and from ``data.unlabelled_path``, with targets from
the teacher (the student learns the teacher's outputs, which need no labels; a small labelled set is what lets a
pruned student overfit).
"""

from __future__ import annotations

import copy
import dataclasses

from edgetl.config import Recipe
from edgetl.data import NO_SPARE, Split, concat
from edgetl.errors import EdgetlError
from edgetl.measure import torch_outputs
from edgetl.state import State
from edgetl.train import Distill, best, evaluate, fit


def feature_layers(state: State, cfg) -> tuple:
    """The layers the intermediate-feature loss matches: the recipe's, else every transformer layer or the head's
    input (``""``)."""
    from edgetl.backbones import encoder_layer_names

    if cfg.feature_layers:
        return tuple(cfg.feature_layers)
    layers = encoder_layer_names(state.backbone.model) if state.backbone.transformer else []
    return tuple(layers) or ("",)


def transfer_set(state: State, size: int, seed: int) -> tuple[Split, dict]:
    """The training split plus up to ``size`` spare examples (training-pool leftovers, unlabelled examples) with the
    teacher's targets (the leftovers' own labels are only used to report how often the teacher got them right)."""
    import numpy as np

    task, train = state.task, state.data.train
    if size <= 0:
        return train, {}
    if not state.data.n_spare:
        raise EdgetlError(NO_SPARE)
    extra = state.data.spare(size, seed)
    outputs = torch_outputs(state.teacher.eval(), state.modality.feeds(extra))
    targets = np.concatenate([task.pseudo_targets(o) for o in outputs])
    known = extra.labels >= 0
    agree = task.score(targets[known], extra.labels[known]).value if known.any() else None
    said = [f"{int((~known).sum())} of them from data.unlabelled_path"] if not known.all() else []
    if agree is not None:
        said.append(
            f"its targets score {agree:.1f} ({task.metric_name}) against the hidden labels of the "
            f"{int(known.sum())} training-pool leftovers"
        )
    print(
        f"  transfer set: {len(train)} labelled + {len(extra)} spare examples labelled by the teacher "
        f"({'; '.join(said)})"
    )
    return concat(train, dataclasses.replace(extra, labels=targets)), {
        "transfer_extra": len(extra),
        "transfer_unlabelled": int((~known).sum()),
        "transfer_teacher_metric": agree,
    }


def run(state: State, recipe: Recipe) -> State:
    cfg = recipe.distill
    if state.teacher is None:
        raise EdgetlError("distill needs a teacher: add a finetune section before it")
    model, mod, task = state.backbone.model, state.modality, state.task
    bs = recipe.data.batch_size
    train_split, transfer = transfer_set(state, cfg.transfer_size, recipe.seed + 21)
    train = mod.loader(train_split, bs, augment=recipe.data.augment, shuffle=True, seed=recipe.seed + 20)
    val = mod.loader(state.data.val, bs)
    before = evaluate(model, val, task)["metric"].value
    for p in model.parameters():
        p.requires_grad_(True)
    objective = Distill(
        task,
        state.teacher,
        cfg.alpha,
        cfg.temperature,
        cfg.feature_weight,
        feature_layers(state, cfg),
        state.backbone.head,
    )
    history = fit(
        model,
        train,
        val,
        task=task,
        objective=objective,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_epochs=0.0,
        patience=cfg.patience,
        desc="distill",
        train=recipe.train,
    )
    after = best(history, task)
    print(f"  distillation: val {task.metric_name} {before:.2f} -> {after:.2f}")
    return state.replace(
        history={**state.history, "distill": history},
        metrics={
            **state.metrics,
            "distill": {"metric": task.metric_name, "val_metric_before": before, "val_metric_after": after, **transfer},
        },
        models={**state.models, "distilled": copy.deepcopy(model).eval()},
    )

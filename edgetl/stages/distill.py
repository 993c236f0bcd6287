"""Knowledge distillation: the fine-tuned FP32 model (before pruning) teaches the current, smaller model.

Loss = alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * cross-entropy, plus optionally
``feature_weight`` * MSE between intermediate features (text: every transformer layer's hidden states, which
head/FFN pruning leaves the same width; images: the classifier's input through a learned projection), through
the same ``fit`` loop as fine-tuning (the teacher is an argument, not a second trainer). The report shows
accuracy before and after, so the recovery from pruning is visible.

``transfer_size`` > 0 distils on a larger transfer set: the training split plus that many examples drawn from
the training-pool examples that ``data.max_train`` left out and from ``data.unlabelled_path``, labelled by the
teacher (the student learns the teacher's outputs, which need no labels; a small labelled set is what lets a
pruned student overfit).
"""

from __future__ import annotations

import copy
import dataclasses

from edgetl.config import Recipe
from edgetl.data import NO_SPARE, Split, concat, feeds, make_loader
from edgetl.errors import EdgetlError
from edgetl.pipeline import State
from edgetl.train import Distill, evaluate, fit


def feature_layers(state: State, cfg) -> tuple:
    """The layers the intermediate-feature loss matches: the recipe's, else every transformer layer (text) or the
    classifier's input (images, ``""``)."""
    from edgetl.backbones import encoder_layer_names

    if cfg.feature_layers:
        return tuple(cfg.feature_layers)
    layers = encoder_layer_names(state.backbone.model) if state.tokenizer is not None else []
    return tuple(layers) or ("",)


def transfer_set(state: State, size: int, seed: int) -> tuple[Split, dict]:
    """The training split plus up to ``size`` spare examples (training-pool leftovers, unlabelled examples) labelled
    by the teacher's top-1 (the leftovers' own labels are only used to report how often the teacher got them
    right)."""
    from edgetl.stages.verify import torch_predictions

    train = state.data.train
    if size <= 0:
        return train, {}
    if not state.data.n_spare:
        raise EdgetlError(NO_SPARE)
    extra = state.data.spare(size, seed)
    teacher_top1 = torch_predictions(state.teacher.eval(), feeds(extra, state.backbone.contract.preprocess,
                                                                 state.tokenizer))
    known = extra.labels >= 0
    agree = 100.0 * float((teacher_top1[known] == extra.labels[known]).mean()) if known.any() else None
    said = [f"{int((~known).sum())} of them from data.unlabelled_path"] if not known.all() else []
    if agree is not None:
        said.append(f"{agree:.1f}% of its labels match the hidden ones of the {int(known.sum())} training-pool "
                    "leftovers")
    print(f"  transfer set: {len(train)} labelled + {len(extra)} spare examples labelled by the teacher "
          f"({'; '.join(said)})")
    return concat(train, dataclasses.replace(extra, labels=teacher_top1)), {
        "transfer_extra": len(extra), "transfer_unlabelled": int((~known).sum()), "transfer_teacher_acc": agree}


def run(state: State, recipe: Recipe) -> State:
    cfg = recipe.distill
    if state.teacher is None:
        raise EdgetlError("distill needs a teacher: add a finetune section before it")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise EdgetlError("distill.alpha must be between 0 and 1")
    if cfg.feature_weight < 0:
        raise EdgetlError("distill.feature_weight must be 0 or more")
    if cfg.transfer_size < 0:
        raise EdgetlError("distill.transfer_size must be 0 or more")
    model = state.backbone.model
    pre = state.backbone.contract.preprocess
    bs = recipe.data.batch_size
    train_split, transfer = transfer_set(state, cfg.transfer_size, recipe.seed + 21)
    train = make_loader(train_split, pre, bs, augment=recipe.data.augment, shuffle=True, seed=recipe.seed + 20,
                        tokenizer=state.tokenizer)
    val = make_loader(state.data.val, pre, bs, tokenizer=state.tokenizer)
    before = evaluate(model, val)["acc"]
    for p in model.parameters():
        p.requires_grad_(True)
    history = fit(model, train, val, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=0.0,
                  patience=cfg.patience, distill=Distill(state.teacher, cfg.alpha, cfg.temperature, cfg.feature_weight,
                                                         feature_layers(state, cfg), state.backbone.head),
                  desc="distill")
    after = max(h["val_acc"] for h in history)
    print(f"  distillation: val accuracy {before:.2f}% -> {after:.2f}%")
    return state.replace(history={**state.history, "distill": history},
                         metrics={**state.metrics, "distill": {"val_acc_before": before, "val_acc_after": after,
                                                                **transfer}},
                         models={**state.models, "distilled": copy.deepcopy(model).eval()})

"""Knowledge distillation: the fine-tuned FP32 model (before pruning) teaches the current, smaller model.

Loss = alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * cross-entropy, plus optionally
``feature_weight`` * MSE between intermediate features (text: every transformer layer's hidden states, which
head/FFN pruning leaves the same width; images: the classifier's input through a learned projection), through
the same ``fit`` loop as fine-tuning (the teacher is an argument, not a second trainer). The report shows
accuracy before and after, so the recovery from pruning is visible.
"""

from __future__ import annotations

import copy

from edgetl.config import Recipe
from edgetl.data import make_loader
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


def run(state: State, recipe: Recipe) -> State:
    cfg = recipe.distill
    if state.teacher is None:
        raise EdgetlError("distill needs a teacher: add a finetune section before it")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise EdgetlError("distill.alpha must be between 0 and 1")
    if cfg.feature_weight < 0:
        raise EdgetlError("distill.feature_weight must be 0 or more")
    model = state.backbone.model
    pre = state.backbone.contract.preprocess
    bs = recipe.data.batch_size
    train = make_loader(state.data.train, pre, bs, augment=recipe.data.augment, shuffle=True, seed=recipe.seed + 20,
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
                         metrics={**state.metrics, "distill": {"val_acc_before": before, "val_acc_after": after}},
                         models={**state.models, "distilled": copy.deepcopy(model).eval()})

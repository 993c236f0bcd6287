"""``finetune.strategy: auto`` and ``edgetl advise``: the transfer-learning scenario table, made executable.

Two measurements on the loaded data, before any fine-tuning:

- **data size**: labelled training examples per class;
- **similarity** of the data to the backbone's pretraining: a logistic-regression probe (scikit-learn) on the frozen
  pretrained features of a sample, against the same probe on the features of the same architecture with random
  weights. The gain in points says how much the pretrained features already separate these classes.

The table (``choose``, a pure function; measured against every strategy at equal budget in
``benchmarks/strategies.py``: on data unlike ImageNet, layer-wise LR decay over MobileNetV2's 19 blocks leaves the
early blocks nearly frozen, and one LR did best):

| | similar (pretrained features help) | different |
|---|---|---|
| small (< 50 per class) | ``linear_probe`` | ``freeze`` the first half of the blocks |
| medium (< 500 per class) | ``freeze`` the first third | ``full``, one LR for all layers |
| large | ``full``, layer-wise LR 0.8 | ``full``, one LR for all layers |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgetl.errors import EdgetlError

SMALL, MEDIUM = 50, 500  # training examples per class
SIMILAR_GAIN = 15.0  # probe points the pretrained features add over random ones
SIMILAR_ACC = 60.0  # and the probe on pretrained features reaches at least this (percent)
PROBE_TRAIN, PROBE_VAL = 1000, 500  # examples the probes see (the first of each split)


@dataclass(frozen=True)
class Advice:
    strategy: str
    freeze_blocks: int
    lr_decay: float
    per_class: float  # training examples per class
    probe_pretrained: float  # validation accuracy (%) of a linear probe on the pretrained features
    probe_random: float  # the same on randomly initialised features of the same architecture
    reason: str

    @property
    def gain(self) -> float:
        return self.probe_pretrained - self.probe_random

    def describe(self) -> str:
        return (
            f"{self.per_class:.0f} training examples per class; linear probe {self.probe_pretrained:.1f}% on the "
            f"pretrained features vs {self.probe_random:.1f}% on random ones ({self.gain:+.1f} points) -> "
            f"{self.strategy}"
            + (f" (freeze_blocks {self.freeze_blocks})" if self.strategy == "freeze" else "")
            + (f", lr_decay {self.lr_decay}" if self.strategy in ("full", "freeze") else "")
            + f": {self.reason}"
        )


def choose(per_class: float, probe_pretrained: float, probe_random: float, blocks: int) -> Advice:
    """The scenario table: a strategy from the data size and the pretrained features' gain."""
    similar = probe_pretrained - probe_random >= SIMILAR_GAIN and probe_pretrained >= SIMILAR_ACC
    size = "small" if per_class < SMALL else "medium" if per_class < MEDIUM else "large"
    table = {
        ("small", True): ("linear_probe", 0, 1.0, "few examples and features that already separate them"),
        ("small", False): ("freeze", blocks // 2, 0.8, "few examples: keep the generic early blocks, adapt the rest"),
        ("medium", True): ("freeze", blocks // 3, 0.8, "similar data: fine-tune the later blocks only"),
        ("medium", False): ("full", 0, 1.0, "data unlike the pretraining: every block adapts, at one learning rate"),
        ("large", True): ("full", 0, 0.8, "enough data to fine-tune everything at layer-wise learning rates"),
        ("large", False): ("full", 0, 1.0, "enough data unlike the pretraining: one learning rate for all layers"),
    }
    strategy, freeze, decay, why = table[(size, similar)]
    return Advice(
        strategy,
        freeze,
        decay,
        per_class,
        probe_pretrained,
        probe_random,
        f"{size} data, {'similar' if similar else 'different'} domain: {why}",
    )


def _features(model, head: str, loader) -> tuple[np.ndarray, np.ndarray]:
    """The pooled features before ``head`` for every batch of ``loader``, and the labels."""
    import torch

    from edgetl.backbones import replace_module
    from edgetl.train import call

    old = model.get_submodule(head)
    replace_module(model, head, torch.nn.Identity())
    try:
        model.eval()
        xs, ys = [], []
        with torch.inference_mode():
            for x, y in loader:
                xs.append(call(model, x).flatten(1).numpy())
                ys.append(np.asarray(y))
    finally:
        replace_module(model, head, old)
    return np.concatenate(xs), np.concatenate(ys)


def _probe(model, head: str, train, val) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xt, yt = _features(model, head, train)
    xv, yv = _features(model, head, val)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    scaler = StandardScaler().fit(xt)
    with warnings.catch_warnings():  # a fixed 300-iteration budget is part of the measurement, not a fault
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=300, C=0.5).fit(scaler.transform(xt), yt)
    return 100.0 * float((clf.predict(scaler.transform(xv)) == yv).mean())


def advise(state) -> Advice:
    """Measure the loaded ``state``'s data and backbone and choose a strategy."""
    import torch

    from edgetl.backbones import build_backbone
    from edgetl.data import Split

    if state.task.name != "classification":
        raise EdgetlError("finetune.strategy auto measures a classification probe: set a strategy for this task")
    data, mod = state.data, state.modality

    def first(split, n):
        return Split(
            labels=split.labels[:n],
            images=split.images[:n] if split.images is not None else None,
            texts=list(split.texts[:n]) if split.texts is not None else None,
        )

    train, val = first(data.train, PROBE_TRAIN), first(data.val, PROBE_VAL)
    loaders = mod.loader(train, 64), mod.loader(val, 64)
    pretrained = _probe(state.backbone.model, state.backbone.head, *loaders)
    torch.manual_seed(state.recipe.seed)
    cfg = dataclasses.replace(state.recipe.backbone, pretrained=False)
    random = build_backbone(cfg, state.task)
    random_acc = _probe(random.model, random.head, *loaders)
    per_class = len(data.train) / max(len(data.classes), 1)
    return choose(per_class, pretrained, random_acc, len(state.backbone.blocks))


def apply(cfg, advice: Advice):
    """The finetune section with the advised strategy (epochs, LR and the rest as the recipe says)."""
    return dataclasses.replace(
        cfg, strategy=advice.strategy, freeze_blocks=advice.freeze_blocks, lr_decay=advice.lr_decay
    )


def advise_recipe(recipe) -> Advice:
    """``edgetl advise``: load the recipe's data and backbone as a build would, measure, choose; no training."""
    import tempfile
    from pathlib import Path

    import torch

    from edgetl.stages import load
    from edgetl.state import State

    torch.manual_seed(recipe.seed)
    with tempfile.TemporaryDirectory(prefix="edgetl-advise-") as tmp:
        return advise(load.run(State(recipe=recipe, workdir=Path(tmp)), recipe))

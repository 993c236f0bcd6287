"""Classification (images or texts): one label per example, a linear head, logits out.

Loss: label-smoothed cross-entropy; distillation: Hinton's temperature-scaled KL mixed with it; predictions:
argmax; metric: accuracy (percent, higher is better); agreement: same top-1; the teacher labels spare data with
its top-1; the report adds a confusion matrix and the per-class change of the shipped model. The runtime side
(softmax, top-k) is ``edgetl/runner.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.tasks.base import Metric, Parity, output_parity


def kd_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float, label_smoothing: float = 0.0):
    """Hinton-style distillation loss; with alpha=0 it is exactly the (label-smoothed) cross-entropy."""
    import torch.nn.functional as F

    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, -1),
        F.log_softmax(teacher_logits / t, -1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * t * t * kl + (1.0 - alpha) * ce


class Classification:
    name = "classification"
    metric_name = "accuracy"
    higher_is_better = True
    output_names = ("logits",)
    hf_auto_class = "AutoModelForSequenceClassification"
    float_tail = False  # INT8: leave the nodes after the last Conv / MatMul in float (quantize_onnx)
    optimum_task = "text-classification"

    def __init__(self, classes: list[str]):
        self.classes = list(classes)
        self.num_outputs = len(self.classes)

    def head(self, in_features: int):
        from torch import nn

        return nn.Linear(in_features, len(self.classes))

    def output_axes(self) -> dict:
        return {"logits": {0: "batch"}}

    def loss(self, outputs, targets, label_smoothing: float = 0.0, model=None):
        import torch.nn.functional as F

        return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)

    def distill_loss(
        self, student, teacher, targets, alpha: float, temperature: float, label_smoothing: float = 0.0, model=None
    ):
        return kd_loss(student, teacher, targets, alpha, temperature, label_smoothing)

    def decode(self, outputs: np.ndarray, feed: dict | None = None, params=None) -> np.ndarray:
        return np.asarray(outputs).argmax(-1)

    def decode_params(self, model=None, metadata: dict | None = None):
        return None  # argmax needs nothing beyond the outputs

    def export_metadata(self, model) -> dict:
        return {}

    def bundle_files(self, metadata: dict) -> dict:
        return {}  # softmax needs nothing beside the model

    def eval_extras(self, targets: np.ndarray) -> dict:
        return {}

    def batch_targets(self, targets: np.ndarray, feed: dict) -> np.ndarray:
        return targets

    def score(self, predictions: np.ndarray, targets: np.ndarray) -> Metric:
        acc = 100.0 * float((np.asarray(predictions) == np.asarray(targets)).mean()) if len(targets) else 0.0
        return Metric(self.metric_name, acc, self.higher_is_better)

    def agreement(self, predictions: np.ndarray, reference: np.ndarray, targets=None) -> float:
        return 100.0 * float((np.asarray(predictions) == np.asarray(reference)).mean())

    def parity(self, reference: list[np.ndarray], got: list[np.ndarray], atol: float, rtol: float) -> Parity:
        same = sum(int((self.decode(r) == self.decode(g)).sum()) for r, g in zip(reference, got, strict=True))
        return output_parity(reference, got, atol, rtol, same, sum(len(r) for r in reference))

    def pseudo_targets(self, teacher_outputs: np.ndarray) -> np.ndarray:
        return self.decode(teacher_outputs)

    def details(self, predictions: np.ndarray, targets: np.ndarray) -> dict:
        n = len(self.classes)
        confusion = np.zeros((n, n), dtype=int)  # rows: true class, columns: prediction
        np.add.at(confusion, (np.asarray(targets), np.asarray(predictions)), 1)
        return {"confusion": confusion.tolist()}

    def check_outputs(self, outputs: Any) -> None:
        if outputs.shape[-1] != len(self.classes):
            raise EdgetlError(
                f"the model outputs {outputs.shape[-1]} scores for {len(self.classes)} classes; "
                "keep 'head' in prune.protect"
            )

    n_examples = 0  # the confusion matrix says more than a few examples

    def examples(self, inputs: list, predictions, targets, n: int) -> list[dict]:
        return []

    def report_sections(self) -> list[tuple[str, Callable[[dict], str]]]:
        return [("Confusion matrix (shipped model)", confusion), ("", per_class_change)]


# ---------------------------------------------------------------------------------------------------------------
# report sections


def confusion(report: dict) -> str:
    from edgetl.report import _classes, _figure, _png, _rotation, _shipped

    ship = _shipped(report)
    if not ship or not ship.get("confusion"):
        return "<p class='muted'>no confusion matrix for the shipped model</p>"
    cm = np.asarray(ship["confusion"], dtype=float)
    names = _classes(report, len(cm))
    side = min(4 + 0.45 * len(cm), 12)
    fig, ax = _figure(side, side * 0.85)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if len(cm) <= 20:
        for (i, j), v in np.ndenumerate(cm):
            ax.text(
                j, i, f"{v:g}", ha="center", va="center", fontsize=8, color="white" if v > cm.max() / 2 else "black"
            )
    ticks = range(len(cm)) if len(cm) <= 40 else []
    ax.set_xticks(list(ticks), [names[t] for t in ticks], **_rotation(names))
    ax.set_yticks(list(ticks), [names[t] for t in ticks])
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix: {ship['stage']} (test set)")
    return _png(fig)


def per_class_change(report: dict) -> str:
    from edgetl.report import _classes, _figure, _png, _rotation, _row, _shipped

    ship, teacher = _shipped(report), _row(report, "fp32")
    if not ship or not teacher or ship is teacher or not ship.get("confusion") or not teacher.get("confusion"):
        return ""

    def recall(cm: list) -> Any:
        a = np.asarray(cm, dtype=float)
        return 100 * np.diag(a) / np.maximum(a.sum(axis=1), 1)

    delta = recall(ship["confusion"]) - recall(teacher["confusion"])
    names = _classes(report, len(delta))
    fig, ax = _figure(max(6, 0.5 * len(delta)), 3.5)
    ax.bar(range(len(delta)), delta, color=["#b3261e" if d < 0 else "#16794a" for d in delta])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(delta)), names, **_rotation(names))
    ax.set(ylabel="points", title=f"per-class accuracy: {ship['stage']} minus fp32 teacher (test set)")
    ax.grid(alpha=0.3, axis="y")
    return f"<h2>Per-class accuracy change</h2>{_png(fig)}"

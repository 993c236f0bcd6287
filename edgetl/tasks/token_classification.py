"""Token classification (named-entity recognition): one tag per word, a per-token linear head, logits [B, T, C] out.

Words are aligned to sub-word tokens by the fast tokenizer's ``word_ids`` (``edgetl.tagging``): the first token of a
word carries its IOB2 tag, the others are ignored (-100) in the loss, the distillation and the metric. Loss:
cross-entropy over tagged tokens; distillation: the temperature-scaled KL per tagged token mixed with it;
predictions: argmax per real token; metric: entity-level micro F1 with ``seqeval`` (an entity counts only with its
exact span and type), per-type F1 in the report row; agreement: per real token. The runtime side (argmax per word,
IOB2 spans with character offsets) is ``edgetl/runner.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.tagging import IGNORE
from edgetl.tasks.base import Metric, Parity
from edgetl.tasks.classification import kd_loss


class TokenClassification:
    name = "token_classification"
    metric_name = "entity F1"
    higher_is_better = True
    output_names = ("logits",)
    hf_auto_class = "AutoModelForTokenClassification"
    optimum_task = "token-classification"
    words = True  # examples are word lists (the text modality aligns word tags to tokens)

    def __init__(self, tags: list[str]):
        self.classes = list(tags)
        self.num_outputs = len(self.classes)

    def head(self, in_features: int):
        from torch import nn

        return nn.Linear(in_features, self.num_outputs)

    def output_axes(self) -> dict:
        return {"logits": {0: "batch", 1: "sequence"}}

    def loss(self, outputs, targets, label_smoothing: float = 0.0):
        import torch.nn.functional as F

        return F.cross_entropy(
            outputs.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, label_smoothing=label_smoothing
        )

    def distill_loss(self, student, teacher, targets, alpha: float, temperature: float, label_smoothing: float = 0.0):
        """Hinton KD per tagged token (the first token of each word), mixed with the cross-entropy on its tag."""
        keep = targets.flatten() != IGNORE
        return kd_loss(
            student.flatten(0, 1)[keep],
            teacher.flatten(0, 1)[keep],
            targets.flatten()[keep],
            alpha,
            temperature,
            label_smoothing,
        )

    def decode(self, outputs: np.ndarray, feed: dict | None = None) -> list[np.ndarray]:
        """Per example, the argmax tag of each real token (its attention mask's length)."""
        ids = np.asarray(outputs).argmax(-1)
        lengths = feed["attention_mask"].sum(1) if feed is not None else [ids.shape[1]] * len(ids)
        return [row[: int(n)] for row, n in zip(ids, lengths, strict=True)]

    def batch_targets(self, targets: np.ndarray, feed: dict) -> list[np.ndarray]:
        return [row[: int(n)] for row, n in zip(targets, feed["attention_mask"].sum(1), strict=True)]

    def _sequences(self, predictions, targets) -> tuple[list[list[str]], list[list[str]]]:
        """Tag names at the tagged tokens (one per word) of every example, gold and predicted."""
        gold, pred = [], []
        for p, t in zip(predictions, targets, strict=True):
            keep = np.asarray(t) != IGNORE
            gold.append([self.classes[i] for i in np.asarray(t)[keep]])
            pred.append([self.classes[i] for i in np.asarray(p)[keep]])
        return gold, pred

    def score(self, predictions, targets) -> Metric:
        from seqeval.metrics import f1_score
        from seqeval.scheme import IOB2

        gold, pred = self._sequences(predictions, targets)
        f1 = f1_score(gold, pred, mode="strict", scheme=IOB2, zero_division=0) if gold else 0.0
        return Metric(self.metric_name, 100.0 * float(f1), self.higher_is_better)

    def agreement(self, predictions, reference, targets=None) -> float:
        """Per token: every real token, or with ``targets`` the tagged ones (the first token of each word: the
        others are never trained, so their argmax is noise)."""
        same = total = 0
        for i, (p, r) in enumerate(zip(predictions, reference, strict=True)):
            keep = np.asarray(targets[i]) != IGNORE if targets is not None else np.ones(len(r), bool)
            same += int((np.asarray(p)[keep] == np.asarray(r)[keep]).sum())
            total += int(keep.sum())
        return 100.0 * same / max(total, 1)

    def parity(self, reference: list[np.ndarray], got: list[np.ndarray], atol: float, rtol: float) -> Parity:
        diff = max(float(np.abs(r - g).max()) for r, g in zip(reference, got, strict=True))
        scale = max(float(np.abs(r).max()) for r in reference)
        same = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(reference, got, strict=True))
        n = sum(r.shape[0] * r.shape[1] for r in reference)
        return Parity(diff, atol + rtol * scale, same / max(n, 1), n)

    def pseudo_targets(self, teacher_outputs: np.ndarray):
        raise EdgetlError("distill.transfer_size is not supported for token_classification yet")

    def details(self, predictions, targets) -> dict:
        from seqeval.metrics import classification_report
        from seqeval.scheme import IOB2

        gold, pred = self._sequences(predictions, targets)
        report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
        per_type = {
            k: {"f1": 100.0 * v["f1-score"], "support": int(v["support"])}
            for k, v in report.items()
            if k not in ("micro avg", "macro avg", "weighted avg")
        }
        tagged = sum(int((np.asarray(t) != IGNORE).sum()) for t in targets)
        correct = sum(
            int(((np.asarray(p) == np.asarray(t)) & (np.asarray(t) != IGNORE)).sum())
            for p, t in zip(predictions, targets, strict=True)
        )
        return {"per_entity": per_type, "token_accuracy": 100.0 * correct / max(tagged, 1)}

    def check_outputs(self, outputs: Any) -> None:
        if outputs.dim() != 3 or outputs.shape[-1] != self.num_outputs:
            raise EdgetlError(
                f"the model outputs shape {tuple(outputs.shape)}; expected [batch, tokens, {self.num_outputs} tags]"
            )

    def report_sections(self) -> list[tuple[str, Callable[[dict], str]]]:
        return [("Entity F1 per type", per_entity)]


def per_entity(report: dict) -> str:
    """Per entity type F1 of every measured model (test set), as a table and a grouped bar chart."""
    from html import escape

    from edgetl.report import _figure, _fmt, _png, _table

    rows = [r for r in report.get("rows") or [] if r.get("per_entity")]
    if not rows:
        return "<p class='muted'>no per-entity scores</p>"
    types = sorted({t for r in rows for t in r["per_entity"]})
    header = ["model", "token accuracy %"] + [f"{t} F1 (n)" for t in types]
    cells = [
        [escape(r["stage"]), _fmt(r.get("token_accuracy"))]
        + [
            f"{_fmt(r['per_entity'].get(t, {}).get('f1'))} ({r['per_entity'].get(t, {}).get('support', 0)})"
            for t in types
        ]
        for r in rows
    ]
    fig, ax = _figure(max(6, 1.2 * len(types) * len(rows) / 2), 3.5)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(
            [j + i * width for j in range(len(types))],
            [r["per_entity"].get(t, {}).get("f1", 0) for t in types],
            width,
            label=r["stage"],
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types)
    ax.set(ylabel="F1 (%)", title="entity F1 per type (test set)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _table(header, cells, ["ship" if r.get("shipped") else "" for r in rows]) + _png(fig)

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
from edgetl.tasks.base import Metric, Parity, output_parity
from edgetl.tasks.classification import kd_loss


class TokenClassification:
    name = "token_classification"
    metric_name = "entity F1"
    higher_is_better = True
    output_names = ("logits",)
    hf_auto_class = "AutoModelForTokenClassification"
    float_tail = False  # INT8: leave the nodes after the last Conv / MatMul in float (quantize_onnx)
    optimum_task = "token-classification"
    words = True  # examples are word lists (the text modality aligns word tags to tokens)

    def __init__(self, tags: list[str], crf: bool = False, crf_lr_scale: float = 100.0):
        self.classes = list(tags)
        self.num_outputs = len(self.classes)
        self.crf = crf  # a CRF over the word tags: trained jointly (NLL), Viterbi decoding
        self.extra_lr_scale = crf_lr_scale  # the extra modules' (CRF's) LR over the fine-tune LR

    def extra_modules(self) -> dict:
        """Modules the backbone wrapper holds beside the head: the CRF (its scores train with the model and ship in
        the ONNX metadata; the graph itself gives the emissions)."""
        if not self.crf:
            return {}
        from torchcrf import CRF

        return {"crf": CRF(self.num_outputs, batch_first=True)}

    def head(self, in_features: int):
        from torch import nn

        return nn.Linear(in_features, self.num_outputs)

    def output_axes(self) -> dict:
        return {"logits": {0: "batch", 1: "sequence"}}

    @staticmethod
    def _words(emissions, targets):
        """Emissions, tags and mask at the tagged tokens (one per word), packed left: [B, W, C], [B, W], [B, W]."""
        import torch

        keep = targets != IGNORE
        lengths = keep.sum(1)
        width = max(int(lengths.max()), 1)
        em = emissions.new_zeros(len(emissions), width, emissions.shape[-1])
        tags = torch.zeros(len(emissions), width, dtype=torch.long)
        mask = torch.zeros(len(emissions), width, dtype=torch.bool)
        for b in range(len(emissions)):
            idx = keep[b].nonzero().squeeze(1)
            em[b, : len(idx)], tags[b, : len(idx)], mask[b, : len(idx)] = emissions[b, idx], targets[b, idx], True
        mask[:, 0] = True  # the CRF needs every sequence to start: an empty one scores tag 0 once
        return em, tags, mask

    def _crf_nll(self, model, outputs, targets):
        em, tags, mask = self._words(outputs, targets)
        return -model.crf(em, tags, mask=mask, reduction="token_mean")

    def loss(self, outputs, targets, label_smoothing: float = 0.0, model=None):
        import torch.nn.functional as F

        if self.crf and getattr(model, "crf", None) is not None:
            return self._crf_nll(model, outputs, targets)
        return F.cross_entropy(
            outputs.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, label_smoothing=label_smoothing
        )

    def distill_loss(
        self, student, teacher, targets, alpha: float, temperature: float, label_smoothing: float = 0.0, model=None
    ):
        """Hinton KD per tagged token (the first token of each word), mixed with the cross-entropy on its tag (or,
        with a CRF, its negative log-likelihood)."""
        keep = targets.flatten() != IGNORE
        s, t, y = student.flatten(0, 1)[keep], teacher.flatten(0, 1)[keep], targets.flatten()[keep]
        if self.crf and getattr(model, "crf", None) is not None:
            kd = kd_loss(s, t, y, 1.0, temperature) if alpha > 0 else 0.0
            return alpha * kd + (1.0 - alpha) * self._crf_nll(model, student, targets)
        return kd_loss(s, t, y, alpha, temperature, label_smoothing)

    def decode(self, outputs: np.ndarray, feed: dict | None = None, params=None) -> list[np.ndarray]:
        """Per example, a tag for each real token (its attention mask's length): the argmax, or with a CRF the
        Viterbi path over the tokens that start a word (``feed["_word_starts"]``), as the runtime decodes."""
        from edgetl.runner import viterbi

        ids = np.asarray(outputs).argmax(-1)
        lengths = feed["attention_mask"].sum(1) if feed is not None else [ids.shape[1]] * len(ids)
        rows = [row[: int(n)].copy() for row, n in zip(ids, lengths, strict=True)]
        if params is not None and feed is not None and "_word_starts" in feed:
            for b, row in enumerate(rows):
                pos = np.flatnonzero(feed["_word_starts"][b][: len(row)])
                if len(pos):
                    row[pos] = viterbi(np.asarray(outputs)[b, pos], **params)
        return rows

    def decode_params(self, model=None, metadata: dict | None = None):
        """The CRF's scores (start, end, transitions) from a torch model, or from an ONNX file's metadata."""
        import json

        if not self.crf:
            return None
        if model is not None and getattr(model, "crf", None) is not None:
            crf = model.crf
            scores = {"start": crf.start_transitions, "end": crf.end_transitions, "transitions": crf.transitions}
            return {k: v.detach().numpy().copy() for k, v in scores.items()}
        if metadata and "edgetl.crf" in metadata:
            return {k: np.asarray(v, np.float32) for k, v in json.loads(metadata["edgetl.crf"]).items()}
        return None

    def export_metadata(self, model) -> dict:
        import json

        params = self.decode_params(model=model)
        return {"edgetl.crf": json.dumps({k: v.tolist() for k, v in params.items()})} if params else {}

    def bundle_files(self, metadata: dict) -> dict:
        """Side files for runtimes that do not read ONNX metadata (Node): preprocess key -> (file name, text)."""
        return {"crf": ("crf.json", metadata["edgetl.crf"])} if "edgetl.crf" in metadata else {}

    def eval_extras(self, targets: np.ndarray) -> dict:
        """What decoding a loader batch needs beyond its inputs: which tokens start a word (they carry a tag)."""
        return {"_word_starts": targets != IGNORE}

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
        same = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(reference, got, strict=True))
        return output_parity(reference, got, atol, rtol, same, sum(r.shape[0] * r.shape[1] for r in reference))

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

    n_examples = 6

    def examples(self, inputs: list, predictions, targets, n: int) -> list[dict]:
        """Test sentences with their gold and predicted word tags (words past max_length have no tag: cut)."""
        out = []
        for words, p, t in list(zip(inputs, predictions, targets, strict=False))[:n]:
            keep = np.asarray(t) != IGNORE
            gold = [self.classes[i] for i in np.asarray(t)[keep]]
            pred = [self.classes[i] for i in np.asarray(p)[keep]]
            out.append({"words": list(words)[: len(gold)], "gold": gold, "pred": pred})
        return out

    def report_sections(self) -> list[tuple[str, Callable[[dict], str]]]:
        return [("Entity F1 per type", per_entity), ("Test sentences: gold vs predicted entities", sentences)]


def _marked(words: list[str], tags: list[str]) -> str:
    """Words with each IOB2 entity wrapped in <mark> and its type after it."""
    from html import escape

    parts, open_kind = [], None
    for w, tag in zip(words, tags, strict=True):
        if open_kind and not (tag.startswith("I-") and tag[2:] == open_kind):
            parts[-1] += f"</mark><sub>{escape(open_kind)}</sub>"
            open_kind = None
        if tag != "O" and open_kind is None:
            parts.append(f"<mark>{escape(w)}")
            open_kind = tag[2:]
        else:
            parts.append(escape(w))
    if open_kind:
        parts[-1] += f"</mark><sub>{escape(open_kind)}</sub>"
    return " ".join(parts)


def sentences(report: dict) -> str:
    """A few test sentences with the gold and the shipped model's entities highlighted."""
    found = ((report.get("metrics") or {}).get("verify") or {}).get("examples") or []
    if not found:
        return "<p class='muted'>no example sentences</p>"
    rows = "".join(
        f"<tr><td>gold</td><td style='text-align:left'>{_marked(e['words'], e['gold'])}</td></tr>"
        f"<tr><td>shipped</td><td style='text-align:left'>{_marked(e['words'], e['pred'])}</td></tr>"
        for e in found
    )
    return f"<table>{rows}</table><p class='muted'>the shipped model under ONNX Runtime, test split</p>"


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

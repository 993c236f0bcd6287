"""Sequence-to-sequence generation: a target text per source text (punctuation restoration, summarisation,
translation), a transformers encoder-decoder (``edgetl.seq2seq``), greedy generation with a KV cache.

Training: teacher forcing, cross-entropy (with label smoothing) over the target tokens; distillation: the
temperature-scaled KL per target token (word-level KD). Predictions are generated token ids (PyTorch: transformers'
``generate``; ONNX: ``runner.Generator``, the device's loop, which returns the same padded ids), cut at the end
token; texts come from the tokenizer's own decoder. Metric: corpus BLEU with ``sacrebleu`` (its 13a tokenisation);
chrF (sacrebleu), ROUGE-L F (``rouge-score``) and exact match beside it. References are the target texts as the
tokenizer writes them back (``decode(encode(target))``, truncated to ``task.max_target_length``): an uncased
tokenizer cannot produce capitals, and the metric should not count what the model cannot say. Agreement (with the
teacher, ORT vs PyTorch): the share of examples whose generated tokens are identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.tagging import IGNORE
from edgetl.tasks.base import Metric, Parity

METRICS = {"bleu": "BLEU", "chrf": "chrF", "rougeL": "ROUGE-L", "exact_match": "exact match"}


class Seq2Seq:
    name = "seq2seq"
    higher_is_better = True
    output_names = ("ids",)
    num_outputs = 0
    hf_auto_class = "AutoModelForSeq2SeqLM"
    optimum_task = "text2text-generation-with-past"
    float_tail = False
    words = False
    generates = True  # outputs are generated token ids (an encoder + decoder pair of ONNX files)
    n_examples = 8

    def __init__(
        self, max_target_length: int = 64, max_new_tokens: int | None = None, num_beams: int = 1, metric: str = "bleu"
    ):
        self.metric = metric  # which of details() the gates use
        self.metric_name = METRICS[metric]
        self.classes: list[str] = []
        self.max_target_length = max_target_length
        self.max_new_tokens = max_new_tokens or max_target_length
        self.num_beams = num_beams
        self.tokenizer = None  # set by the load stage (texts for the metric); ids -> text with its decoder
        self.ids: dict = {}  # start_id, eos_id, pad_id: set with the backbone

    def head(self, in_features: int):
        raise EdgetlError("seq2seq models keep their own LM head")

    def output_axes(self) -> dict:
        return {}

    def generation(self) -> dict:
        return {**self.ids, "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "length_penalty": 1.0}

    # -- training -------------------------------------------------------------------------------------------------

    def loss(self, outputs, targets, label_smoothing: float = 0.0, model=None):
        import torch.nn.functional as F

        return F.cross_entropy(
            outputs.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, label_smoothing=label_smoothing
        )

    def distill_loss(
        self, student, teacher, targets, alpha: float, temperature: float, label_smoothing: float = 0.0, model=None
    ):
        """Word-level KD: Hinton's loss per target token, mixed with the cross-entropy on the reference token."""
        from edgetl.tasks.classification import kd_loss

        keep = targets.flatten() != IGNORE
        s, t, y = student.flatten(0, 1)[keep], teacher.flatten(0, 1)[keep], targets.flatten()[keep]
        return kd_loss(s, t, y, alpha, temperature, label_smoothing)

    # -- decoding -------------------------------------------------------------------------------------------------

    def _cut(self, row) -> np.ndarray:
        """Token ids up to (not including) the end token, without padding or ignored positions."""
        row = np.asarray(row)
        end = np.flatnonzero(row == self.ids["eos_id"])
        row = row[: end[0]] if len(end) else row
        return row[(row != IGNORE) & (row != self.ids["pad_id"])].astype(np.int64)

    def decode(self, outputs: np.ndarray, feed: dict | None = None, params=None) -> list[np.ndarray]:
        """Generated ids per example; given teacher-forced logits (a training loader's batch), generate from the
        batch's inputs with ``params["model"]``."""
        outputs = np.asarray(outputs)
        if outputs.ndim == 3:
            import torch

            model = (params or {}).get("model")
            if model is None or feed is None:
                raise EdgetlError("seq2seq predictions are generated: decoding needs the model and its inputs")
            ids, mask = (torch.from_numpy(np.asarray(feed[k])) for k in ("input_ids", "attention_mask"))
            outputs = model(ids, mask).numpy()
        return [self._cut(row) for row in outputs]

    def decode_params(self, model=None, metadata: dict | None = None):
        return {"model": model} if model is not None else None

    def export_metadata(self, model) -> dict:
        return {"edgetl.generation": json.dumps(self.generation())}

    def bundle_files(self, metadata: dict) -> dict:
        return {"generation": ("generation.json", metadata["edgetl.generation"])}

    def eval_extras(self, targets: np.ndarray) -> dict:
        return {}

    def batch_targets(self, targets: np.ndarray, feed: dict) -> list[np.ndarray]:
        return [self._cut(row) for row in targets]

    def texts(self, ids: list) -> list[str]:
        """Token ids -> texts with the tokenizer's decoder (texts pass through)."""
        if len(ids) == 0 or isinstance(ids[0], str):
            return list(ids)
        return self.tokenizer.decode_batch([self._cut(r).tolist() for r in ids], skip_special_tokens=True)

    # -- metrics --------------------------------------------------------------------------------------------------

    def score(self, predictions, targets) -> Metric:
        if self.metric == "bleu":  # the default, and the cheapest: no ROUGE pass
            import sacrebleu

            hyps, refs = self.texts(list(predictions)), self.texts(list(targets))
            value = sacrebleu.corpus_bleu(hyps, [refs]).score if refs else 0.0
        else:
            value = self.details(predictions, targets)[self.metric]
        return Metric(self.metric_name, float(value), self.higher_is_better, unit="")

    def agreement(self, predictions, reference, targets=None) -> float:
        same = sum(np.array_equal(self._cut(p), self._cut(r)) for p, r in zip(predictions, reference, strict=True))
        return 100.0 * same / max(len(reference), 1)

    def parity(self, reference: list[np.ndarray], got: list[np.ndarray], atol: float, rtol: float) -> Parity:
        """Generated ids, ORT vs PyTorch: the fraction of differing tokens (tolerance: none) and of identical
        sequences (the export stage's agreement)."""
        ref = [self._cut(r) for batch in reference for r in batch]
        out = [self._cut(g) for batch in got for g in batch]
        same = sum(np.array_equal(r, g) for r, g in zip(ref, out, strict=True))
        return Parity(0.0, 0.0, same / max(len(ref), 1), len(ref))

    def pseudo_targets(self, teacher_outputs: np.ndarray):
        raise EdgetlError("distill.transfer_size is not supported for seq2seq yet")

    def relabel(self, split, targets: list):
        """``split`` with other targets: generated ids (sequence-level KD) or texts, as texts the way the tokenizer
        writes them back (references are compared that way too)."""
        import dataclasses

        if len(targets) and isinstance(targets[0], str):
            targets = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in targets]
        return dataclasses.replace(split, targets=self.texts(list(targets)))

    def details(self, predictions, targets) -> dict:
        import sacrebleu
        from rouge_score import rouge_scorer

        hyps, refs = self.texts(list(predictions)), self.texts(list(targets))
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        rouge = [scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps, strict=True)]
        return {
            "bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score) if refs else 0.0,
            "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score) if refs else 0.0,
            "rougeL": 100.0 * float(np.mean(rouge)) if rouge else 0.0,
            "exact_match": 100.0 * float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)])) if refs else 0.0,
            "mean_tokens": float(np.mean([len(p) for p in predictions])) if len(predictions) else 0.0,
        }

    def check_outputs(self, outputs: Any) -> None:
        return None

    def examples(self, inputs: list, predictions, targets, n: int) -> list[dict]:
        hyps, refs = self.texts(list(predictions)[:n]), self.texts(list(targets)[:n])
        return [{"source": s, "reference": r, "output": h} for s, r, h in zip(inputs, refs, hyps, strict=False)]

    def report_sections(self) -> list[tuple[str, Callable[[dict], str]]]:
        return [("Generation metrics", scores), ("Test examples: source, reference, shipped model's output", samples)]


def scores(report: dict) -> str:
    """BLEU, chrF, ROUGE-L, exact match and output length of every measured model (test set)."""
    from html import escape

    from edgetl.report import _fmt, _metric_name, _table

    rows = [r for r in report.get("rows") or [] if "chrf" in r]
    if not rows:
        return "<p class='muted'>no generation metrics</p>"
    gated = _metric_name(report)
    header = [
        "model",
        f"{gated} ORT",
        f"{gated} PyTorch",
        "BLEU",
        "chrF",
        "ROUGE-L",
        "exact match %",
        "tokens / output",
    ]
    cells = [
        [escape(r["stage"]), _fmt(r["metric_ort"]), _fmt(r["metric_torch"])]
        + [_fmt(r.get(k)) for k in ("bleu", "chrf", "rougeL", "exact_match", "mean_tokens")]
        for r in rows
    ]
    return _table(header, cells, ["ship" if r.get("shipped") else "" for r in rows])


def samples(report: dict) -> str:
    from html import escape

    found = ((report.get("metrics") or {}).get("verify") or {}).get("examples") or []
    if not found:
        return "<p class='muted'>no examples</p>"
    rows = "".join(
        f"<tr><td>source</td><td style='text-align:left'>{escape(e['source'])}</td></tr>"
        f"<tr><td>reference</td><td style='text-align:left'>{escape(e['reference'])}</td></tr>"
        f"<tr><td>shipped</td><td style='text-align:left'><b>{escape(e['output'])}</b></td></tr>"
        for e in found
    )
    return f"<table>{rows}</table><p class='muted'>greedy generation under ONNX Runtime, test split</p>"

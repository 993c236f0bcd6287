"""The task protocol: everything the pipeline needs to know about *what* a model predicts.

A task owns its head, its training loss and distillation loss, how raw outputs become predictions, its metric
(with the direction that is better), agreement with a teacher, the ONNX outputs it exports and how close ONNX
Runtime must stay to PyTorch on them, the labels a teacher gives unlabelled data, and its report sections. The
stages, ``measure``, the report and the CLI talk to the task only through this protocol, so a new task
(detection, token classification, seq2seq) is a new module here plus its runtime post-processing, not an edit
of the stages. Inputs (images, tokens) are the other axis: ``edgetl.modalities``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Metric:
    """A measured value that knows which way is better (Olive's ``higher_is_better``)."""

    name: str  # "accuracy", "mAP", "entity F1", "BLEU"
    value: float
    higher_is_better: bool = True
    unit: str = "%"

    def better_than(self, other: Metric | None) -> bool:
        if other is None:
            return True
        return self.value > other.value if self.higher_is_better else self.value < other.value

    def drop_from(self, reference: Metric) -> float:
        """How much worse than ``reference`` (positive = worse), in the metric's own units."""
        return reference.value - self.value if self.higher_is_better else self.value - reference.value

    def __str__(self) -> str:
        return f"{self.name} {self.value:.2f}{self.unit}"


@dataclass(frozen=True)
class Parity:
    """How close ONNX Runtime's outputs are to PyTorch's on the same inputs."""

    max_abs_diff: float  # over every exported output
    tolerance: float  # what max_abs_diff may reach (scale-aware: atol + rtol * the reference's magnitude)
    agreement: float  # fraction of examples (or tokens, boxes) whose decoded prediction is the same
    n: int  # examples compared

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def output_parity(reference: list, got: list, atol: float, rtol: float, same: int, compared: int, n=None) -> Parity:
    """Parity of raw outputs over every batch: the largest |ORT - PyTorch| against atol + rtol * max|reference|,
    and the agreement ``same / compared`` of what the task decodes (``n``: examples, default ``compared``)."""
    diff = max(float(np.abs(r - g).max()) for r, g in zip(reference, got, strict=True))
    scale = max(float(np.abs(r).max()) for r in reference)
    return Parity(diff, atol + rtol * scale, same / max(compared, 1), compared if n is None else n)


class Task(Protocol):
    """One task family. Methods on numpy take *raw model outputs* (what the ONNX graph returns); predictions are
    whatever ``decode`` makes of them (class ids, boxes, tag sequences, token ids)."""

    name: str  # the recipe's task.kind
    metric_name: str  # the primary metric, gated by verify.min_metric / max_metric_drop
    higher_is_better: bool
    output_names: tuple[str, ...]  # ONNX outputs, in order
    num_outputs: int  # width of the head (classes, tags); libraries that build their own head take it
    hf_auto_class: str  # transformers Auto class for hf: backbones
    optimum_task: str  # optimum's exporter task name
    float_tail: bool  # INT8 leaves every node after the last Conv / MatMul in float (a detector's raw outputs)
    # optional (getattr defaults): the ONNX graph takes any batch (False: one example per run, a two-stage detector's
    # traced graph), and how the device's golden check compares outputs ("values", or "detections": matched boxes)
    batch_axis: bool
    golden_compare: str

    def head(self, in_features: int) -> Any:
        """The new torch head on top of a pretrained trunk's features."""

    def output_axes(self) -> dict:
        """Dynamic axes of the ONNX outputs."""

    def loss(self, outputs: Any, targets: Any, label_smoothing: float = 0.0) -> Any:
        """The training loss (torch)."""

    def distill_loss(
        self, student: Any, teacher: Any, targets: Any, alpha: float, temperature: float, label_smoothing: float = 0.0
    ) -> Any:
        """Loss against the teacher's outputs, mixed with the task loss (torch)."""

    def decode(self, outputs: np.ndarray, feed: dict | None = None):
        """Predictions for one batch of raw outputs (``feed``: the inputs that made them, e.g. attention masks)."""

    def bundle_files(self, metadata: dict) -> dict:
        """Files the runtime decodes with, from the shipped ONNX file's metadata: preprocess.json key -> (file name,
        text), e.g. a CRF's scores or a detector's anchors (for runtimes that do not read ONNX metadata)."""

    def batch_targets(self, targets: np.ndarray, feed: dict):
        """A loader's batch of targets as per-example targets (e.g. padded token labels trimmed to real length)."""

    def score(self, predictions: np.ndarray, targets: np.ndarray) -> Metric:
        """The primary metric of predictions against targets."""

    def agreement(self, predictions, reference, targets=None) -> float:
        """Percent of predictions equal to the reference model's (teacher agreement, ORT vs PyTorch); ``targets``,
        where given, may restrict which positions count (tokens that carry a word tag)."""

    def parity(self, reference: list[np.ndarray], got: list[np.ndarray], atol: float, rtol: float) -> Parity:
        """ORT vs PyTorch on the same batches of raw outputs."""

    def pseudo_targets(self, teacher_outputs: np.ndarray) -> np.ndarray:
        """Targets a teacher gives unlabelled examples (distillation's transfer set)."""

    def relabel(self, split, targets: list):
        """``split`` with the teacher's decoded outputs as its targets (seq2seq's sequence-level KD; only tasks that
        allow ``distill.sequence_level`` have it)."""

    def details(self, predictions: np.ndarray, targets: np.ndarray) -> dict:
        """Per-model extras for the report row (a confusion matrix, per-class AP ...)."""

    def check_outputs(self, outputs: Any) -> None:
        """Raise EdgetlError when a (pruned) model's outputs no longer fit the task."""

    n_examples: int  # test examples the report shows with their predictions (0: none)

    def examples(self, inputs: list, predictions, targets, n: int) -> list[dict]:
        """The first ``n`` test examples with gold and predicted targets, for the report (JSON-ready)."""

    def report_sections(self) -> list[tuple[str, Callable[[dict], str]]]:
        """HTML sections (title, render(report) -> html) the task adds to report.html."""

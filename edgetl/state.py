"""What flows between the stages: one frozen ``State``, replaced (never mutated) by every stage.

It lives in its own module so that stages, the pipeline and the library modules can all import it without an
import cycle; it imports no stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.config import Recipe


@dataclass(frozen=True)
class State:
    recipe: Recipe
    workdir: Path  # the bundle being written (a temp dir until the end)
    task: Any = None  # edgetl.tasks.base.Task: head, loss, metric, agreement, ONNX outputs, report sections
    modality: Any = None  # edgetl.modalities.Modality: inputs (decode, collate, feeds, examples, calibration)
    data: Any = None  # edgetl.data.Data
    backbone: Any = None  # edgetl.backbones.Backbone; .model is the current model
    teacher: Any = None  # the fine-tuned FP32 model, kept for distillation and agreement
    tokenizer: Any = None  # text backbones: a tokenizers.Tokenizer built from the bundle's tokenizer.json
    reference: Any = None  # edgetl.tasks.base.Metric: the fine-tuned model's test metric (the drop gate's base)
    history: dict = field(default_factory=dict)  # stage -> per-epoch rows
    rows: list = field(default_factory=list)  # report rows, one per measured model
    onnx: dict = field(default_factory=dict)  # role ("fp32", "int8", ...) -> file name inside workdir
    models: dict = field(default_factory=dict)  # role -> the PyTorch model that ONNX file was exported from
    metrics: dict = field(default_factory=dict)  # stage -> whatever it measured
    timings: dict = field(default_factory=dict)  # stage -> seconds

    def replace(self, **kw) -> State:
        return dataclasses.replace(self, **kw)

    @property
    def preprocess(self) -> dict:
        return self.backbone.contract.preprocess


FLOAT_ROLES = ("distilled", "pruned", "fp32")  # newest first: the float model each later stage starts from


def float_role(state: State) -> str | None:
    """The newest float model that has an ONNX file."""
    return next((r for r in FLOAT_ROLES if r in state.onnx), None)


def shipped_role(state: State) -> str | None:
    """What ships as model.onnx: the INT8 model quantize chose, else the newest float model."""
    return state.metrics.get("quantize", {}).get("chosen") or float_role(state)

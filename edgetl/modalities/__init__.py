"""Modalities: how examples of one input kind become model inputs (the second axis beside the task).

``modality_for(preprocess, tokenizer)`` is the one place that looks at ``preprocess["kind"]``; everything else asks
the modality object: decode a pool into a split, ONNX-style feeds, torch loaders, an example for tracing, the
inputs used for parity, latency and calibration, and how INT8 is built for it.
"""

from __future__ import annotations

from typing import Any


def modality_for(pre: dict, tokenizer: Any = None, words: bool = False, target: Any = None):
    """The modality of a backbone's preprocessing (``kind`` image or text); ``words``: the task reads word lists;
    ``target``: a tokenizer for target texts (seq2seq)."""
    if pre.get("kind") == "text":
        from edgetl.modalities.text import Text

        return Text(pre, tokenizer, words, target)
    from edgetl.modalities.image import Image

    return Image(pre)

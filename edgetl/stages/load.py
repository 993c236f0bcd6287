"""Build the backbone and load the data it will be trained on (the backbone fixes the preprocessing)."""

from __future__ import annotations

from edgetl.backbones import build_backbone
from edgetl.config import Recipe
from edgetl.data import NO_SPARE, TEXT_KINDS, load_data, open_sources
from edgetl.errors import EdgetlError
from edgetl.pipeline import State


def run(state: State, recipe: Recipe) -> State:
    transfer = recipe.distill.transfer_size if recipe.distill else 0
    if recipe.data.unlabelled_path and transfer <= 0:
        raise EdgetlError("data.unlabelled_path is only used by distillation's transfer set: set "
                          "distill.transfer_size (e.g. --set distill.transfer_size=5000) or remove it")
    sources = open_sources(recipe.data)  # class names first: the head needs their count
    backbone = build_backbone(recipe.backbone, len(sources[1]))
    pre = backbone.contract.preprocess
    tokenizer = None
    if pre.get("kind") == "text":
        from edgetl.runner import load_tokenizer

        pre["max_length"] = recipe.data.max_length
        tokenizer = load_tokenizer(backbone.tokenizer_file, recipe.data.max_length)
    elif recipe.data.kind in TEXT_KINDS:
        raise EdgetlError(f"data.kind={recipe.data.kind} is text but {recipe.backbone.name} is an image backbone")
    if pre.get("kind") == "text" and recipe.data.kind not in TEXT_KINDS:
        raise EdgetlError(f"{recipe.backbone.name} is a text backbone: use data.kind csv, jsonl or rotten_tomatoes")
    data = load_data(recipe.data, pre, recipe.seed, sources)
    if transfer > 0 and not data.n_spare:  # now, not after fine-tuning
        raise EdgetlError(NO_SPARE)
    shape = f"max {pre['max_length']} tokens" if tokenizer else f"input {pre['crop']}px"
    print(f"  {recipe.backbone.name}: {len(data.classes)} classes, "
          f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}, {shape}")
    return state.replace(data=data, backbone=backbone, tokenizer=tokenizer)

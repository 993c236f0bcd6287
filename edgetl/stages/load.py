"""Build the backbone and load the data it will be trained on (the backbone fixes the preprocessing)."""

from __future__ import annotations

from edgetl.backbones import build_backbone
from edgetl.config import Recipe
from edgetl.data import load_data, open_sources
from edgetl.pipeline import State


def run(state: State, recipe: Recipe) -> State:
    sources = open_sources(recipe.data)  # class names first: the head needs their count
    backbone = build_backbone(recipe.backbone, len(sources[1]))
    data = load_data(recipe.data, backbone.contract.preprocess, recipe.seed, sources)
    print(f"  {recipe.backbone.name}: {len(data.classes)} classes, "
          f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}, "
          f"input {backbone.contract.preprocess['crop']}px")
    return state.replace(data=data, backbone=backbone)

"""Transfer-learning strategies side by side at an equal budget, and what ``finetune.strategy: auto`` picks.

For each data set the data and the pretrained backbone are loaded once; then every strategy fine-tunes a copy for
the same epochs at the same peak LR, and the test metric of each is printed beside the one ``auto`` chose
(edgetl/advise.py) and a plain fine-tune with one learning rate for all layers.

    .venv/bin/python benchmarks/strategies.py [--sets digits,fmnist,text]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETS = {  # small budgets that fit a 2-core CPU: the comparison is at equal budget, not at convergence
    "digits": {
        "name": "strategies_digits",
        "seed": 0,
        "backbone": {"name": "torchvision:mobilenet_v2", "pretrained": "IMAGENET1K_V1", "input_size": 32},
        "data": {"kind": "digits", "max_train": 500, "batch_size": 64, "augment": {"hflip": False}},
        "finetune": {"epochs": 6, "lr": 0.003, "patience": 10},
    },
    "fmnist": {
        "name": "strategies_fmnist",
        "seed": 0,
        "backbone": {"name": "torchvision:mobilenet_v2", "pretrained": "IMAGENET1K_V1", "input_size": 64},
        "data": {"kind": "fashion_mnist", "max_train": 2000, "max_val": 500, "max_test": 1000, "batch_size": 64},
        "finetune": {"epochs": 3, "lr": 0.002, "patience": 10},
    },
    "text": {
        "name": "strategies_text",
        "seed": 0,
        "backbone": {"name": "hf:sentence-transformers/all-MiniLM-L6-v2"},
        "data": {
            "kind": "rotten_tomatoes",
            "max_train": 1500,
            "max_val": 300,
            "max_test": 1000,
            "batch_size": 32,
            "max_length": 64,
        },
        "finetune": {"epochs": 2, "lr": 0.0001, "patience": 10},
    },
}


def variants(blocks: int) -> dict:
    return {
        "linear_probe": {"strategy": "linear_probe"},
        "freeze (first half)": {"strategy": "freeze", "freeze_blocks": blocks // 2},
        "full (layer-wise LR 0.8)": {"strategy": "full", "lr_decay": 0.8},
        "gradual_unfreeze": {"strategy": "gradual_unfreeze"},
        "plain (full, one LR)": {"strategy": "full", "lr_decay": 1.0},
    }


def main() -> None:
    import torch

    from edgetl.advise import advise, apply
    from edgetl.config import recipe_from_dict
    from edgetl.runner import device_info
    from edgetl.stages import finetune, load
    from edgetl.state import State

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="digits,fmnist,text")
    args = ap.parse_args()
    t0, table = time.time(), []
    for key in args.sets.split(","):
        raw = copy.deepcopy(SETS[key])
        raw["finetune"]["strategy"] = "full"
        recipe = recipe_from_dict(raw)
        torch.manual_seed(0)
        base = load.run(State(recipe=recipe, workdir=Path("/tmp")), recipe)
        advice = advise(base)
        print(f"{key}: auto: {advice.describe()}", flush=True)
        results = {}
        for name, change in variants(len(base.backbone.blocks)).items():
            cfg = dataclasses.replace(recipe.finetune, **change)
            r = dataclasses.replace(recipe, finetune=cfg)
            backbone = copy.copy(base.backbone)
            backbone.model = copy.deepcopy(base.backbone.model)
            torch.manual_seed(0)
            out = finetune.run(base.replace(recipe=r, backbone=backbone), r)
            results[name] = (cfg, out.reference.value)
            print(f"  {name}: test {out.reference}", flush=True)
        cfg = apply(recipe.finetune, advice)  # what auto chose, trained like the others
        r = dataclasses.replace(recipe, finetune=cfg)
        backbone = copy.copy(base.backbone)
        backbone.model = copy.deepcopy(base.backbone.model)
        torch.manual_seed(0)
        auto = finetune.run(base.replace(recipe=r, backbone=backbone), r).reference.value
        print(f"  auto ({cfg.strategy}): test {auto:.2f}", flush=True)
        best = max(v for _, v in results.values())
        table.append((key, cfg, results, auto, best))
    print(f"\ndevice: {device_info()} ({time.time() - t0:.0f} s)")
    names = list(table[0][2]) if table else []
    print("| data | " + " | ".join(names) + " | auto picks | auto | auto - best | auto - plain |")
    print("|---" * (len(names) + 5) + "|")
    for key, cfg, results, auto, best in table:
        cells = " | ".join(f"{results[n][1]:.1f}" for n in names)
        pick = cfg.strategy + (f" {cfg.freeze_blocks}" if cfg.strategy == "freeze" else "")
        pick += f", lr_decay {cfg.lr_decay}" if cfg.strategy in ("full", "freeze") else ""
        plain = results["plain (full, one LR)"][1]
        print(f"| {key} | {cells} | {pick} | {auto:.1f} | {auto - best:+.1f} | {auto - plain:+.1f} |")


if __name__ == "__main__":
    main()

"""Structured pruning stage: channels (CNNs, Torch-Pruning DepGraph) or attention heads and FFN neurons
(transformer encoders; a seq2seq model's encoder and decoder) physically removed in ``steps`` increments, each
followed by a short recovery fine-tune through the one ``fit`` loop; ``prune.target_macs`` searches the ratio that
lands on a MACs budget first. ``prune.input_size`` (image classifiers) first makes the model resize its input to a
lower resolution inside the graph; the channel budget then counts at that size. The library side is
``edgetl.compress.prune``.
"""

from __future__ import annotations

import copy
import dataclasses

from edgetl.compress.prune import prune_step, pruner_for, ratio_for_macs, resize_input
from edgetl.config import PruneCfg, Recipe
from edgetl.errors import EdgetlError
from edgetl.measure import count_params_macs
from edgetl.state import State
from edgetl.train import TaskLoss, call, fit


def run(state: State, recipe: Recipe) -> State:
    import torch

    cfg = recipe.prune
    model, mod, task = state.backbone.model, state.modality, state.task
    example, measure = mod.trace_example(state.data.val)  # DepGraph traces one example, the op counter counts it
    params0, macs0 = count_params_macs(model, measure)
    macs_full = macs0
    if cfg.input_size is not None:
        full = mod.pre["crop"]
        if cfg.input_size >= full:
            raise EdgetlError(f"recipe key 'prune.input_size': {cfg.input_size} must be below the input size {full}")
        resize_input(model, cfg.input_size)
        params0, macs0 = count_params_macs(model, measure)
        share = f" ({100 * macs0 / macs_full:.0f}% of the MACs)" if macs0 and macs_full else ""
        print(f"  input resized to {cfg.input_size} px inside the model{share}")
    channels = cfg.target_macs is not None or cfg.ratio > 0
    smoothing = recipe.finetune.label_smoothing if recipe.finetune else 0.0
    train = mod.loader(
        state.data.train, recipe.data.batch_size, augment=recipe.data.augment, shuffle=True, seed=recipe.seed + 10
    )
    val = mod.loader(state.data.val, recipe.data.batch_size)
    for p in model.parameters():
        p.requires_grad_(True)

    def build(m, c: PruneCfg):
        return pruner_for(m, example, c, state.backbone)

    if cfg.target_macs is not None:  # search the ratio that lands on the MACs target, then prune for real
        trial = dataclasses.replace(cfg, importance="magnitude")
        ratio, reached = ratio_for_macs(
            model,
            lambda m, r: build(m, dataclasses.replace(trial, ratio=r)),
            measure,
            cfg.target_macs,
            steps=max(cfg.steps, 1),
        )
        print(f"  target MACs {cfg.target_macs:.0%}: ratio {ratio:.3f} (search estimate {reached:.1%})")
        cfg = dataclasses.replace(cfg, ratio=ratio)
    pruner = build(model, cfg) if channels else None
    history, steps = [], []
    n_steps = max(cfg.steps, 1) if channels else 1  # resolution only: one recovery fine-tune at the new size
    for step in range(n_steps):
        model.eval()
        if pruner is not None:
            prune_step(pruner, model, example, train, TaskLoss(task))
        params, macs = count_params_macs(model, measure)
        row = {"step": step + 1, "params": params, "macs": macs}
        extra = ""
        if hasattr(pruner, "describe"):  # transformers: heads and FFN neurons left per layer
            units, extra = pruner.describe()
            row.update(units)
        steps.append(row)
        mac_txt = f"MACs {macs / 1e6:.1f}M ({100 * macs / macs0:.0f}%)" if macs and macs0 else "MACs n/a"
        print(
            f"  step {step + 1}/{n_steps}: params {params / 1e6:.2f}M ({100 * params / params0:.0f}%), {mac_txt}{extra}"
        )
        if cfg.recovery_epochs > 0:
            history += fit(
                model,
                train,
                val,
                task=task,
                objective=TaskLoss(task, smoothing),
                epochs=cfg.recovery_epochs,
                lr=cfg.lr,
                warmup_epochs=0.0,
                desc=f"prune recovery {step + 1}/{n_steps}",
                train=recipe.train,
            )
    model.eval()
    with torch.no_grad():
        task.check_outputs(call(model, example))
    metrics = {
        "params_before": params0,
        "macs_before": macs0,  # at prune.input_size, where set
        "macs_fine_tuned": macs_full,
        "input_size": cfg.input_size,
        "params_after": steps[-1]["params"],
        "macs_after": steps[-1]["macs"],
        "steps": steps,
        "ratio": cfg.ratio,
        "target_macs": cfg.target_macs,
    }
    return state.replace(
        history={**state.history, "prune": history},
        metrics={**state.metrics, "prune": metrics},
        models={**state.models, "pruned": copy.deepcopy(model).eval()},
    )

"""The one training loop. Fine-tuning, pruning recovery, distillation and QAT all call ``fit`` with an *objective*.

An objective (timm's training-task idea) turns a batch into a loss: ``TaskLoss`` is the task's own loss,
``Distill`` wraps a teacher and owns its feature projections, so the loop needs no ``distill=`` flag. The loop
itself: AdamW over the given parameter groups (each with its own peak LR), linear warm-up then cosine decay, early
stopping on the task's validation metric (in the direction the task says is better), best weights restored at the
end; a progress bar on a terminal, one line per epoch otherwise (CI logs, ``| tee``).

It runs on Hugging Face Accelerate (``edgetl.distributed``): the device (a GPU where there is one), mixed precision
(autocast, fp16 loss scaling), and under torchrun / ``accelerate launch`` DDP with each process on its shard of the
batches; gradient accumulation skips DDP's all-reduce (``no_sync``) on the batches between optimizer steps. The
model comes back on the CPU, where export and pruning expect it.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgetl.errors import EdgetlError


def call(model, x):
    """Run ``model`` on a batch: a tensor (images) or a dict of named tensors (tokens)."""
    return model(**x) if isinstance(x, dict) else model(x)


def unwrap(model):
    """The model inside a DDP wrapper (the task's loss reads its attributes: a CRF, the default boxes)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def device_of(model):
    return next(model.parameters()).device


@dataclass
class TaskLoss:
    """The task's own loss on the labels."""

    task: Any
    label_smoothing: float = 0.0

    def setup(self, model, loader) -> list:
        """Called once before training, with the model on its training device; returns extra parameters to train
        (none)."""
        return []

    def __call__(self, model, x, y):
        return self.task.loss(call(model, x), y, self.label_smoothing, model=unwrap(model))

    def close(self) -> None:
        pass


def _rows(x):
    """Features with their width last: NCHW conv maps -> (N, H*W, C); (N, C) and (N, T, H) as they are."""
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


class FeatureKD:
    """Forward hooks that capture the same layers in student and teacher, and the MSE between them. Where the
    student's features are narrower (channels pruned), a learned Linear projects them to the teacher's width; those
    projections train with the student and are dropped afterwards."""

    def __init__(self, student, teacher, layers: tuple, head: str):
        self.feats: dict = {"s": {}, "t": {}}
        self.handles = []
        self.projections: dict = {}
        for side, model in (("s", student), ("t", teacher)):
            for name in layers:
                try:
                    module = model.get_submodule(name or head)
                except AttributeError:
                    raise EdgetlError(f"distill.feature_layers: no module '{name}' in the model") from None
                store = self.feats[side]
                if name == "":  # the head's input
                    self.handles.append(
                        module.register_forward_pre_hook(lambda m, args, n=name, d=store: d.__setitem__(n, args[0]))
                    )
                else:
                    self.handles.append(
                        module.register_forward_hook(
                            lambda m, args, out, n=name, d=store: d.__setitem__(
                                n, out[0] if isinstance(out, tuple) else out
                            )
                        )
                    )

    def make_projections(self) -> list:
        """After one forward of both models: Linear projections where widths differ; returns their parameters."""
        import torch

        params = []
        for name, t in self.feats["t"].items():
            s, t = _rows(self.feats["s"][name]), _rows(t)
            if s.shape[-1] != t.shape[-1]:
                self.projections[name] = torch.nn.Linear(s.shape[-1], t.shape[-1], bias=False).to(s.device)
                params += list(self.projections[name].parameters())
            elif s.shape != t.shape:
                raise EdgetlError(
                    f"distill.feature_layers: '{name}' has shape {tuple(s.shape)} in the student and "
                    f"{tuple(t.shape)} in the teacher"
                )
        return params

    def loss(self):
        import torch.nn.functional as F

        terms = []
        for name, t in self.feats["t"].items():
            s, t = _rows(self.feats["s"][name]), _rows(t)
            if name in self.projections:
                s = self.projections[name](s)
            terms.append(F.mse_loss(s, t.detach()))
        return sum(terms) / len(terms)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Distill:
    """Knowledge distillation from ``teacher``: the task's distillation loss (for classification alpha * T^2 *
    KL(student/T || teacher/T) + (1-alpha) * CE), plus ``feature_weight`` * mean MSE between the outputs of
    ``feature_layers`` in student and teacher ("" names the head's input). Owns the feature projections."""

    task: Any
    teacher: Any  # torch.nn.Module, kept in eval mode and never updated
    alpha: float = 0.7
    temperature: float = 4.0
    feature_weight: float = 0.0
    feature_layers: tuple = ()
    head: str = ""  # module name of the head (for the "" layer)
    label_smoothing: float = 0.0
    # the teacher exported to ONNX, run by ONNX Runtime on CPU batches instead of PyTorch (its outputs are the same
    # to the export tolerance, at a fraction of eager PyTorch's time); logits-only KD, as features need hooks
    teacher_session: Any = None
    features: Any = field(default=None, init=False)

    def setup(self, model, loader) -> list:
        import torch
        from accelerate.utils import send_to_device

        self.teacher.eval().to(device_of(model))
        if not (self.feature_weight > 0 and self.feature_layers):
            return []
        self.features = FeatureKD(model, self.teacher, self.feature_layers, self.head)
        with torch.no_grad():  # one forward of each model fixes the feature widths (and any projections)
            x0, _ = next(iter(loader))
            x0 = send_to_device(x0, device_of(model))
            model.eval(), self.teacher.eval()
            call(model, x0), call(self.teacher, x0)
        return self.features.make_projections()

    def __call__(self, model, x, y):
        import torch

        out = call(model, x)
        with torch.no_grad():
            if self.teacher_session is not None and torch.is_tensor(x) and x.device.type == "cpu":
                t_out = torch.from_numpy(self.teacher_session.run(None, {"input": x.float().numpy()})[0])
                t_out = t_out.to(out.dtype) if torch.is_tensor(out) else t_out
            else:
                t_out = call(self.teacher, x)
        loss = self.task.distill_loss(
            out, t_out, y, self.alpha, self.temperature, self.label_smoothing, model=unwrap(model)
        )
        if self.features is not None:
            loss = loss + self.feature_weight * self.features.loss()
        return loss

    def close(self) -> None:
        self.teacher.to("cpu")
        if self.features is not None:
            self.features.remove()


def freeze_frozen_batchnorm(model) -> None:
    """BatchNorm layers whose affine parameters are frozen keep their running statistics too."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


def evaluate(model, loader, task) -> dict:
    """The task's metric (a ``Metric``) and mean task loss over ``loader``."""
    import numpy as np
    import torch
    from accelerate.utils import send_to_device

    from edgetl.measure import flatten

    model.eval()
    dev = device_of(model)
    params = task.decode_params(model=model)
    loss, total, preds, targets = 0.0, 0, [], []
    with torch.inference_mode():
        for x, y in loader:
            out = call(model, send_to_device(x, dev))
            feed = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {"input": x.numpy()}
            ys = y.numpy() if hasattr(y, "numpy") else y  # a tensor, or per-example targets (boxes)
            feed.update(task.eval_extras(ys))
            loss += float(task.loss(out, send_to_device(y, dev), model=model)) * len(y)
            total += len(y)
            preds.append(task.decode(out.cpu().numpy(), feed, params))
            targets.append(task.batch_targets(ys, feed))
    metric = task.score(flatten(preds), flatten(targets)) if preds else task.score(np.zeros(0), np.zeros(0))
    return {"metric": metric, "loss": loss / max(total, 1)}


def best(history: list[dict], task) -> float:
    """The best validation metric in a history, in the task's direction."""
    values = [h["val_metric"] for h in history]
    return max(values) if task.higher_is_better else min(values)


def fit(
    model,
    train_loader,
    val_loader,
    *,
    task,
    objective: Any = None,
    param_groups: list[dict] | None = None,
    epochs: int,
    lr: float,
    weight_decay: float = 0.01,
    warmup_epochs: float = 0.5,
    patience: int | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    desc: str = "train",
    train: Any = None,
) -> list[dict]:
    """Train ``model`` in place on ``objective`` (default: the task's loss) and return one history row per epoch.

    ``param_groups`` are AdamW groups, each with its own ``lr`` (default: every trainable parameter at ``lr``).
    Parameters with ``requires_grad=False`` simply receive no update, so ``on_epoch_start`` may unfreeze
    more of the model as training goes (gradual unfreezing) without rebuilding the optimizer (under DDP the model
    is wrapped again when the trainable set changes: DDP averages only what was trainable when it was built).
    ``train``: the recipe's ``config.TrainCfg`` (device, mixed precision, gradient accumulation).
    """
    import contextlib

    import torch
    from accelerate.utils import send_to_device
    from tqdm.auto import tqdm

    from edgetl import distributed

    if epochs < 1:
        raise EdgetlError(f"{desc}: epochs must be at least 1")
    acc = distributed.accelerator(train)
    accumulate = train.gradient_accumulation_steps if train is not None else 1
    ddp = distributed.distributed()
    model.to(acc.device)
    objective = objective or TaskLoss(task)
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters()], "lr": lr}]
    extra = objective.setup(model, train_loader)
    if extra:
        param_groups = [*param_groups, {"params": extra, "lr": lr}]
        if ddp:  # the feature projections live outside DDP: every process starts from the main one's
            for p in extra:
                torch.distributed.broadcast(p.data, 0)
    if ddp:  # this process's share of the batches (the same shuffled order everywhere: the same seed)
        train_loader = acc.prepare_data_loader(train_loader)
    for g in param_groups:
        g["initial_lr"] = g.get("lr", lr)
    opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    opt.zero_grad(set_to_none=True)  # gradients a pruning importance left behind
    batches = max(len(train_loader), 1)
    steps_per_epoch = math.ceil(batches / accumulate)
    total = epochs * steps_per_epoch
    warm = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    # channels-last convolutions train ~1.5x faster on CPU (oneDNN); weights go back to the default layout below
    channels_last = any(p.dim() == 4 for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    history: list[dict] = []
    best_metric, best_state, stale = None, None, 0
    interactive = sys.stderr.isatty() and acc.is_main_process
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, disable=not interactive)
    wrapped, trainable = model, None
    try:
        for epoch in range(epochs):
            if on_epoch_start:
                on_epoch_start(epoch)
            now = tuple(p.requires_grad for p in model.parameters())
            if ddp and now != trainable:  # DDP also makes every process start from the main one's weights
                wrapped = distributed.wrap(acc, model)
            trainable = now
            model.train()
            freeze_frozen_batchnorm(model)
            run_loss, seen, n_batches, n_steps = 0.0, 0, 0, 0
            for i, (x, y) in enumerate(train_loader):
                x, y = send_to_device((x, y), acc.device)
                if channels_last and not isinstance(x, dict) and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                step = (i + 1) % accumulate == 0 or i + 1 == batches
                with contextlib.nullcontext() if step else acc.no_sync(wrapped):
                    with acc.autocast():
                        loss = objective(wrapped, x, y)
                    if not torch.isfinite(loss):
                        raise EdgetlError(
                            f"{desc}: loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate"
                        )
                    acc.backward(loss / accumulate)
                if step:
                    if ddp:
                        for p in extra:
                            if p.grad is not None:
                                p.grad = acc.reduce(p.grad, reduction="mean")
                    if acc.scaler is not None:  # fp16: unscale, skip a step whose gradients overflowed
                        acc.scaler.step(opt)
                        acc.scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    n_steps += 1
                    bar.update(1)
                run_loss += loss.item() * len(y)
                seen += len(y)
                n_batches += 1
                bar.set_postfix(
                    epoch=f"{epoch + 1}/{epochs}",
                    loss=f"{run_loss / seen:.3f}",
                    val=f"{history[-1]['val_metric']:.1f}" if history else "-",
                )
            if ddp:  # the same model everywhere before evaluating it; the epoch's loss over every process
                distributed.sync_buffers(model)
                sums = acc.reduce(torch.tensor([run_loss, seen], dtype=torch.float64, device=acc.device))
                run_loss, seen = float(sums[0]), int(sums[1])
            val = evaluate(model, val_loader, task)
            row = {
                "epoch": epoch + 1,
                "train_loss": run_loss / max(seen, 1),
                "val_loss": val["loss"],
                "val_metric": val["metric"].value,
                "batches": n_batches,  # in this process: its share when several train
                "steps": n_steps,  # optimizer steps (batches / train.gradient_accumulation_steps)
                "processes": acc.num_processes if ddp else 1,
            }
            history.append(row)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{epochs}", loss=f"{row['train_loss']:.3f}", val=f"{row['val_metric']:.1f}"
            )
            if not interactive and acc.is_main_process:  # one line per epoch in logs, not a bar redrawn per step
                print(
                    f"  {desc} epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, val loss "
                    f"{row['val_loss']:.4f}, val {val['metric']}",
                    flush=True,
                )
            if val["metric"].better_than(best_metric):
                best_metric, best_state, stale = val["metric"], copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    break
    finally:
        bar.close()
        objective.close()  # hooks off even when training fails
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    if best_state is not None:
        model.load_state_dict(best_state)
    if ddp:
        distributed.check_same(model, desc)
    model.to("cpu")
    model.eval()
    return history

"""Quantization-aware training: a fake-quant pass that mirrors ORT's static QDQ during fine-tuning, so the trained
FP32 weights survive the real quantization.

- weights: symmetric per-output-channel int8 (7-bit with ``reduce_range``), straight-through gradients. BatchNorm
  statistics are frozen, and since per-channel symmetric scales follow any per-channel factor, quantizing the
  unfolded weight is the same grid as quantizing the BN-folded weight ORT sees;
- activations: asymmetric uint8 on the input of every Conv/Linear, ranges tracked by EMA min/max.
"""

from __future__ import annotations

import copy


def _weight_fq(qmax: int):
    import torch

    class WeightFakeQuant(torch.nn.Module):
        """Symmetric per-output-channel int8 fake quantization (straight-through gradient)."""

        def forward(self, w):
            dims = tuple(range(1, w.dim()))
            scale = (w.detach().abs().amax(dim=dims) / qmax).clamp(min=1e-8).float()
            zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax, qmax)

    return WeightFakeQuant()


def _act_fq(momentum: float = 0.1):
    import torch

    class ActFakeQuant(torch.nn.Module):
        """Asymmetric uint8 fake quantization with EMA min/max ranges (frozen in eval mode)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("lo", torch.tensor(0.0))
            self.register_buffer("hi", torch.tensor(0.0))
            self.register_buffer("seen", torch.tensor(False))

        def forward(self, x):
            if self.training:
                lo, hi = x.detach().min(), x.detach().max()
                if not bool(self.seen):
                    self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
                else:
                    self.lo.lerp_(lo, momentum), self.hi.lerp_(hi, momentum)
            lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
            if hi - lo < 1e-8:
                return x
            scale = (hi - lo) / 255.0
            zero = int(min(max(round(-lo / scale), 0), 255))
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    return ActFakeQuant()


def attach_fake_quant(model, reduce_range: bool) -> list:
    """Fake-quantize the weights and inputs of every Conv/Linear in place; returns hook handles for detach."""
    import torch.nn as nn
    from torch.nn.utils import parametrize

    qmax = 63 if reduce_range else 127
    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(m, "weight", _weight_fq(qmax))
            m.edgetl_act_fq = _act_fq()
            handles.append(m.register_forward_pre_hook(lambda mod, args: (mod.edgetl_act_fq(args[0]), *args[1:])))
    return handles


def detach_fake_quant(model, handles: list) -> None:
    """Back to a plain float model holding the QAT-trained weights."""
    import torch.nn as nn
    from torch.nn.utils import parametrize

    for h in handles:
        h.remove()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            del m.edgetl_act_fq


def qat(state, recipe, cfg, reduce_range: bool):
    """Quantization-aware fine-tuning of a copy of the current model through the one ``fit`` loop, learning from the
    fine-tuned teacher too when ``quantize.distill``; returns (float model, history)."""
    import torch

    from edgetl.train import Distill, TaskLoss, call, fit, freeze_frozen_batchnorm

    model = copy.deepcopy(state.backbone.model)
    for m in model.modules():  # BN statistics and affine frozen: the folded weights ORT sees stay put
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad_(False)
    handles = attach_fake_quant(model, reduce_range)
    bs, mod, task = recipe.data.batch_size, state.modality, state.task
    train = mod.loader(state.data.train, bs, augment=recipe.data.augment, shuffle=True, seed=recipe.seed + 30)
    val = mod.loader(state.data.val, bs)
    model.train()
    freeze_frozen_batchnorm(model)
    with torch.no_grad():  # initialise activation ranges before the first update
        for i, (x, _) in enumerate(train):
            call(model, x)
            if i == 3:
                break
    objective = TaskLoss(task)
    if cfg.distill and state.teacher is not None:  # same KD weights as the distill stage when there is one
        kd = recipe.distill
        objective = Distill(task, state.teacher, kd.alpha, kd.temperature) if kd else Distill(task, state.teacher)
    params = [p for p in model.parameters() if p.requires_grad]
    history = fit(
        model,
        train,
        val,
        task=task,
        objective=objective,
        param_groups=[{"params": params, "lr": cfg.lr}],
        epochs=cfg.epochs,
        lr=cfg.lr,
        warmup_epochs=0.0,
        desc="qat",
        train=recipe.train,
    )
    detach_fake_quant(model, handles)
    return model.eval(), history

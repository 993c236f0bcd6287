"""Several processes, one build: the training loop on Hugging Face Accelerate under torchrun / ``accelerate launch``.

``torchrun --nproc_per_node N -m edgetl build RECIPE`` (or ``accelerate launch -m edgetl build RECIPE``; several
nodes: torchrun's ``--nnodes`` and ``--rdzv-endpoint``) starts N copies of the build. Each loads the same data with
the same seed, so every process holds the same split. The training stages (``TRAINING_STAGES``: fine-tune, prune
with its recovery fine-tunes, distill) run in all of them: ``train.fit`` wraps the model in DDP (gloo on CPU, NCCL
on GPUs), each process trains on its own share of the batches and the gradients are averaged. At the first stage
after them the other processes stop and the main one (rank 0) goes on alone: it exports, quantizes (QAT runs there,
in one process), verifies, writes the bundle and the stage cache.
"""

from __future__ import annotations

import os

from edgetl.errors import EdgetlError

TRAINING_STAGES = ("finetune", "prune", "distill")  # the stages every process runs; the main one runs the rest alone

_alone = False  # set on the main process once the other processes have done their part


def world_size() -> int:
    """Processes in this build (torchrun and accelerate launch set WORLD_SIZE; a plain run is one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def distributed() -> bool:
    """Whether ``fit`` trains across processes now (several were launched and the main one is not yet alone)."""
    return world_size() > 1 and not _alone


def set_alone(alone: bool) -> None:
    """True: the main process goes on by itself (``fit`` stops wrapping DDP and sharding batches); False: a build
    starts."""
    global _alone
    _alone = alone


def accelerator(cfg=None):
    """The ``accelerate.Accelerator`` for ``train`` settings ``cfg`` (``config.TrainCfg``; None: defaults). Accelerate
    keeps one state per process; a single-process build whose precision or device differs from the last one's
    starts a fresh state (a distributed one keeps its process group: every stage of a recipe has the same
    settings)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    from edgetl.config import TrainCfg

    cfg = cfg or TrainCfg()
    check(cfg)
    cpu = cfg.device == "cpu" or not _cuda()  # Accelerate runs several CPU processes (gloo) only when told cpu
    precision = "no" if cfg.mixed_precision == "fp32" else cfg.mixed_precision  # Accelerate's names
    wanted = {"_mixed_precision": precision, "_cpu": cpu}
    shared = AcceleratorState._shared_state
    if shared and any(shared.get(k, v) != v for k, v in wanted.items()) and world_size() == 1:
        AcceleratorState._reset_state()
    # static_graph: DDP learns from the first step which parameters get gradients (a pooler the task never uses
    # gets none; a CRF's transitions get theirs from a loss computed outside the forward)
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        kwargs_handlers=[DistributedDataParallelKwargs(static_graph=True)],
    )
    if distributed() and acc.num_processes != world_size():
        raise EdgetlError(
            f"{world_size()} processes were launched but Accelerate set up {acc.num_processes} "
            f"({acc.distributed_type}); launch with torchrun or accelerate launch"
        )
    return acc


def check(cfg) -> None:
    """Settings this machine cannot run, refused before the first stage."""
    if cfg.mixed_precision == "fp16" and (cfg.device == "cpu" or not _cuda()):
        raise EdgetlError("train.mixed_precision: fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")


def device_name(cfg) -> str:
    """Where ``fit`` trains for these settings: cuda or cpu."""
    return "cuda" if cfg.device == "auto" and _cuda() else "cpu"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def wrap(acc, model):
    """``model`` in DDP with the Accelerator's settings. Not ``acc.prepare_model``: with mixed precision that patches
    the model's own ``forward`` with autocast, which would stay in the exported and cached model (``fit`` autocasts
    around the loss instead)."""
    from torch.nn.parallel import DistributedDataParallel

    kwargs = acc.ddp_handler.to_kwargs() if acc.ddp_handler is not None else {}
    if acc.device.type == "cuda":
        kwargs.update(device_ids=[acc.local_process_index], output_device=acc.local_process_index)
    return DistributedDataParallel(model, **kwargs)


def share(obj):
    """``obj`` as the main process has it, in every process (pickled through the process group)."""
    if not distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model) -> None:
    """Every process takes the main one's buffers (BatchNorm statistics move with each process's own batches), so
    all evaluate the same model and take the same early-stopping decisions."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


def check_same(model, what: str) -> None:
    """Every process must end a training loop with the main one's weights (DDP averages the gradients, and
    ``sync_buffers`` the statistics): a checksum of the state per process, compared. Fails the build if not."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        total = sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point())
    got: list = [None] * world_size()
    dist.all_gather_object(got, total)
    if len(set(got)) != 1:
        raise EdgetlError(f"{what}: the {world_size()} processes ended with different weights (checksums {got})")


def finish() -> None:
    """Leave the process group (at the end of this process's part of the build)."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

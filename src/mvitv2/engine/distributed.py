"""Process group set-up from torchrun's environment, and the few collectives the engine needs.

Launch with ``torchrun --nproc_per_node=N [--nnodes ... --rdzv-endpoint ...] -m mvitv2.cli ...``
(or the ``mvitv2`` script): torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``. Without them everything runs in one process and the collectives are no-ops.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mvitv2.errors import UserValueError

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Args:
        rank: global rank (0 logs and writes checkpoints).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: the device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that logs and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` over processes (a new float64 tensor on this process's device)."""
        out = values.detach().to(self.device, torch.float64).clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each scalar of ``metrics`` averaged over processes (same keys on every process)."""
        if not self.distributed or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        t = self.all_reduce_sum(
            torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        )
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def all_true(self, flag: bool | torch.Tensor) -> bool:
        """True when ``flag`` holds on every process (one tiny all-reduce)."""
        t = torch.as_tensor(flag, dtype=torch.float64).reshape(1)
        return bool(self.all_reduce_sum(t).item() == self.world_size)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order (for task metrics that need everything)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU), or run alone.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserValueError(
            "device=cuda asked for but CUDA is not available here; use device=cpu or device=auto"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def sync_batchnorm(model: nn.Module, info: DistInfo) -> tuple[nn.Module, str | None]:
    """BatchNorm layers as ``SyncBatchNorm`` when training on several GPUs, as detectron2 does for
    the Cascade heads: the batch statistics then cover the global batch, not one process's images.

    torch's ``SyncBatchNorm`` has no CPU kernels, so on CPU (gloo) the layers stay per-process.

    Args:
        model: the model before DDP wrapping (weights and running statistics are kept).
        info: the process group this run uses.

    Returns:
        ``(model, note)``: the (converted) model and a line saying what was done, or None when
        not distributed or the model has no BatchNorm.
    """
    count = sum(isinstance(m, _BATCH_NORMS) for m in model.modules())
    if not info.distributed or count == 0:
        return model, None
    if info.device.type == "cpu":
        return model, (
            f"{count} BatchNorm layer(s) keep per-process batch statistics: torch's SyncBatchNorm "
            "has no CPU kernels"
        )
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, f"{count} BatchNorm layer(s) converted to SyncBatchNorm (global batch statistics)"


def wrap_ddp(model: nn.Module, info: DistInfo) -> DistributedDataParallel:
    """``model`` in DistributedDataParallel (on ``info``'s GPU, or the CPU), each gradient laid
    out as its parameter before DDP reads it.

    A gradient can differ from its parameter's strides in a size-1 dim alone, the same memory
    order: a class token's gradient at one clip per process is a slice of the tokens' gradient.
    DDP warns about each ("Grad strides do not match bucket view strides") and copies it alike;
    a hook gives such a gradient its parameter's strides first (a copy of its few elements).
    """
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(functools.partial(_strided_as, p.stride()))
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _strided_as(stride: tuple[int, ...], grad: torch.Tensor) -> torch.Tensor:
    if grad.stride() == stride:
        return grad
    return torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def cleanup_distributed() -> None:
    """Leave the process group (call once at the end)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

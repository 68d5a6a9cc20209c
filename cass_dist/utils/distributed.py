"""The collectives the training code relies on, in one place: tested with gloo, used by losses and engine.

- ``gather_with_grad``: every rank's rows, concatenated, with gradient back to each rank's own rows.
  Objectives with batch statistics (VICReg's variance/covariance, Barlow's correlation) compute them
  on it, as the official VICReg code does with its ``FullGatherLayer``.
- ``any_rank``: flags OR-ed over ranks in one small all-reduce, for decisions every rank must take
  alike (skip this window, stop the run).
- ``sync_batchnorm``: BatchNorm layers converted to SyncBatchNorm when more than one process runs on
  CUDA (torch's SyncBatchNorm refuses CPU tensors, so CPU runs keep per-process statistics).

Every helper degrades to a no-op when torch.distributed is not initialised (one process).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from cass_dist.errors import CassError

log = logging.getLogger("cass_dist")
SYNC_BN_CHOICES = ("auto", True, False)


class SyncBatchNormError(CassError, ValueError):
    """``model.sync_bn`` asks for SyncBatchNorm where torch cannot run it (CPU processes)."""

    exit_code = 2


def world_size() -> int:
    """Return the number of processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Return every rank's ``tensor`` concatenated along dim 0 (rank order), differentiable.

    One all-gather forward and one reduce-scatter backward (gloo emulates it). The backward gives this
    rank the SUM over ranks of the gradients w.r.t. its rows: when every rank computes the same loss
    from the gathered rows, that is world_size x this rank's share, and DDP's gradient average divides
    it back, so the parameters get exactly the gradient of the loss on the global batch (the official
    VICReg's ``FullGatherLayer`` has the same scale). Returns ``tensor`` itself on one process.
    Every rank must call it with the same shape.
    """
    if world_size() == 1:
        return tensor
    # torch 2.14 deprecates torch.distributed.nn.functional.all_gather in favour of this one, which
    # carries autograd itself (all-gather forward, reduce-scatter backward) on NCCL and gloo alike.
    from torch.distributed._functional_collectives import all_gather_single, wait_tensor

    return wait_tensor(all_gather_single(tensor.contiguous(), 0, dist.group.WORLD))  # a plain tensor


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Return ``flags`` (a small float tensor, 0 = no, > 0 = yes) maxed over ranks: one all-reduce.

    No host sync happens here: on CUDA the all-reduce is queued behind the work already issued, so
    the caller can issue more (a backward) before reading the answer once (``.tolist()``). Every
    rank must call it at the same point, with the same shape. Returns a new tensor.
    """
    agreed = flags.detach().clone()
    if world_size() > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed


def agree_any(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Return True on every rank when ``flag`` is True on any rank (one all-reduce and one host sync)."""
    return bool(any_rank(torch.tensor([float(flag)], device=device)).item())


def batchnorm_modules(module: nn.Module) -> list[str]:
    """Return the qualified names of ``module``'s BatchNorm layers (SyncBatchNorm included)."""
    return [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def sync_batchnorm(module: nn.Module, mode: str | bool, *, num_processes: int,
                   device: torch.device) -> tuple[nn.Module, str]:
    """Return ``(module, why)``: ``module`` with every BatchNorm turned into SyncBatchNorm, or unchanged.

    ``mode`` "auto" (the default of ``model.sync_bn``) converts when more than one process runs on
    CUDA, the recipe of VICReg and BYOL; True does the same but refuses CPU processes; False never
    converts. Convert before wrapping in DDP (parameters are reused, so an optimizer built before
    stays valid). ``why`` is one line for the log. Raises SyncBatchNormError for True with several
    CPU processes and ValueError for an unknown mode.
    """
    if mode not in SYNC_BN_CHOICES:
        raise ValueError(f"model.sync_bn: must be auto, true or false, got {mode!r}")
    layers = batchnorm_modules(module)
    if mode is False:
        return module, "sync_bn off: BatchNorm statistics are per process"
    if not layers:
        return module, "sync_bn: no BatchNorm layer to sync"
    if num_processes == 1:
        return module, "sync_bn: one process, nothing to sync"
    if device.type != "cuda":
        if mode is True:
            raise SyncBatchNormError(f"model.sync_bn: true needs CUDA processes (torch's SyncBatchNorm refuses "
                                     f"{device.type} tensors); use auto or false on {device.type}")
        return module, (f"sync_bn auto: not on {device.type} (torch's SyncBatchNorm needs CUDA), so the "
                        f"{len(layers)} BatchNorm layers keep per-process statistics")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return converted, f"sync_bn: {len(layers)} BatchNorm layers synced across {num_processes} processes"

"""One optimizer step, shared by every training loop: schedule, accumulation, non-finite guard, clipping.

Pretraining and fine-tuning differ only in what a micro-batch's forward computes; how the step is
taken (and skipped) is the same code, so a fix here reaches both loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from cass_dist.configs.base import ConfigError


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Return the lr multiplier at ``step``: linear warmup to 1, then cosine down to ``min_ratio``.

    A pure function of the global step (no scheduler object), so restoring the step restores the schedule.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def count_steps(batches_per_epoch: int, *, grad_accum_steps: int, max_steps: int, epochs: int,
                split: str) -> tuple[int, int]:
    """Return ``(total optimizer steps, steps per epoch)``: ``max_steps`` if set, else ``epochs`` epochs.

    Raises ConfigError (a ValueError) naming ``data.batch_size`` when an epoch of ``split`` has fewer micro-batches
    per process than one accumulation window.
    """
    steps_per_epoch = batches_per_epoch // grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size: split {split!r} gives {batches_per_epoch} batches per process per "
                         f"epoch, fewer than run.grad_accum_steps={grad_accum_steps}")
    return max_steps or epochs * steps_per_epoch, steps_per_epoch


def set_lrs(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Set every parameter group's lr to its base lr times ``factor``."""
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base_lr * factor


def optimizer_step(accelerator, model, optimizer, window: Sequence[dict], forward: Callable[[dict], dict],
                   *, clip_grad: float = 0.0) -> tuple[bool, torch.Tensor, dict | None]:
    """Accumulate gradients over ``window`` (micro-batches) and take one optimizer step.

    ``forward(batch)`` returns a dict holding at least a scalar ``loss``. Every rank agrees on
    whether a micro-batch's loss is finite before backward (DDP would otherwise wait for a rank that
    skipped); one non-finite micro-batch skips the whole update. Gradients are always zeroed.
    Returns ``(finite, sum of the finite micro-batch losses (detached), the last forward's dict)``.
    """
    finite, loss_sum, out = True, torch.zeros((), device=accelerator.device), None
    for batch in window:
        with accelerator.accumulate(model):
            out = forward(batch)
            loss = out["loss"]
            ok = bool(accelerator.reduce(torch.isfinite(loss.detach()).float(), "min") > 0)
            finite &= ok
            if ok:
                accelerator.backward(loss)
                loss_sum += loss.detach()
            if accelerator.sync_gradients:
                if finite and clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return finite, loss_sum, out

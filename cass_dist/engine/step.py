"""One optimizer step, shared by every training loop: schedule, accumulation, non-finite guard, clipping.

Pretraining and fine-tuning differ only in what a micro-batch's forward computes; how the step is
taken (and skipped) is the same code, so a fix here reaches both loops.

The non-finite guard is decided by all ranks together, once per window:

- Every micro-batch's backward runs on every rank, finite or not. DDP's reducer then sees the same
  sequence everywhere: the first micro-batches accumulate locally (``no_sync``), the last one's
  backward all-reduces. (A rank that skips a backward leaves the reducer expecting one: its next
  ``no_sync`` backward all-reduces after all, pairing with another rank's step. Skipping on one
  rank only is how the ranks drifted apart before.)
- After the last forward, ONE all-reduce (max) of two flags, "some loss of this window was not
  finite on this rank" and "this rank was asked to stop", is queued before the last backward, and
  read once after it: one collective and one host sync per window, none per micro-batch.
- If any rank saw a non-finite loss, every rank skips clipping and ``optimizer.step`` and zeroes the
  gradients (NaN gradients from the all-reduce included): weights stay equal across ranks. The
  buffers the window's forwards updated (BatchNorm running statistics, DINO's centre) are put back
  as they were: a NaN activation would otherwise stay in the running statistics and make every
  later evaluation NaN, although no weight changed. With fp16 the GradScaler is neither unscaled nor
  updated on a skipped window, so its state stays consistent; a finite loss with overflowing
  gradients is the scaler's to skip, as usual, and ``StepOutcome.overflow`` says so (the loops count
  these apart from the non-finite steps: a scaler finding its scale skips a few steps by design).
- DeepSpeed steps its engine inside the last backward (Accelerate's wrapper), so there the answer is
  read BEFORE the last backward, which runs only on a good window. DeepSpeed with accumulation is
  refused at launch (``cass_dist.utils.deepspeed.check_launch``): its earlier micro-batches would
  already sit in the engine's buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from accelerate.utils import DistributedType

from cass_dist.configs.base import ConfigError
from cass_dist.utils.distributed import any_rank


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Return the lr multiplier at ``step``: linear warmup to 1, then cosine down to ``min_ratio``.

    A pure function of the global step (no scheduler object), so restoring the step restores the schedule.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def count_steps(batches_per_epoch: int, *, grad_accum_steps: int, max_steps: int, epochs: int,
                split: str, min_steps: int = 0) -> tuple[int, int]:
    """Return ``(total optimizer steps, steps per epoch)``: ``max_steps`` if set, else ``epochs`` epochs
    but at least ``min_steps`` steps.

    Raises ConfigError (a ValueError) naming ``data.batch_size`` when an epoch of ``split`` has fewer micro-batches
    per process than one accumulation window.
    """
    steps_per_epoch = batches_per_epoch // grad_accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size: split {split!r} gives {batches_per_epoch} batches per process per "
                         f"epoch, fewer than run.grad_accum_steps={grad_accum_steps}")
    return max_steps or max(epochs * steps_per_epoch, min_steps), steps_per_epoch


def set_lrs(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Set every parameter group's lr to its base lr times ``factor``."""
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base_lr * factor


class StepOutcome(NamedTuple):
    """What one window did, agreed by all ranks (``finite``, ``stop``) or local (``loss_sum``, ``out``)."""

    finite: bool  # the step was taken: every micro-batch loss on every rank was finite
    loss_sum: torch.Tensor  # this rank's sum of the window's micro-batch losses (detached); 0 when skipped
    out: dict | None  # the last forward's dict
    stop: bool  # some rank passed stop_requested=True
    overflow: bool  # taken, but the fp16 loss scaler skipped the update (gradients overflowed its scale)


def optimizer_step(accelerator, model, optimizer, window: Sequence[dict], forward: Callable[[dict], dict],
                   *, clip_grad: float = 0.0, stop_requested: bool = False) -> StepOutcome:
    """Accumulate gradients over ``window`` (micro-batches) and take one optimizer step, unless some loss
    on some rank was not finite (then no rank steps; see the module docstring).

    ``forward(batch)`` returns a dict holding at least a scalar ``loss``. ``stop_requested`` (this
    rank got a stop signal) rides in the window's collective, so ``StepOutcome.stop`` is the all-rank
    answer at no extra cost. Gradients are always zeroed; on a skipped window the model's buffers are
    restored. Call on every rank with windows of ``run.grad_accum_steps`` micro-batches. Returns the
    StepOutcome.
    """
    steps_in_backward = accelerator.distributed_type == DistributedType.DEEPSPEED
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]  # a skipped window must leave them as it found them
    nonfinite = torch.zeros(1, device=accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device)
    out, skip, stop, overflow = None, False, False, False
    for batch in window:
        with accelerator.accumulate(model):
            out = forward(batch)
            loss = out["loss"]
            finite = torch.isfinite(loss.detach())
            nonfinite += (~finite).float()
            loss_sum += torch.where(finite, loss.detach(), 0.0)
            if not accelerator.sync_gradients:  # not the last micro-batch: local accumulation only
                accelerator.backward(loss)
                continue
            agreed = any_rank(torch.cat([nonfinite, nonfinite.new_full((1,), float(stop_requested))]))
            if not steps_in_backward:
                accelerator.backward(loss)
            skip, stop = (value > 0 for value in agreed.tolist())  # the window's one host sync
            if not skip:
                if steps_in_backward:
                    accelerator.backward(loss)  # DeepSpeed clips (its JSON) and steps in here
                else:
                    if clip_grad:
                        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                    optimizer.step()
                # Accelerate's wrappers (GradScaler, DeepSpeed's loss scaler) know it host-side: no sync
                overflow = bool(getattr(optimizer, "step_was_skipped", False))
            else:
                with torch.no_grad():
                    for buffer, before in zip(buffers, saved):
                        buffer.copy_(before)
            optimizer.zero_grad(set_to_none=True)
    return StepOutcome(not skip, loss_sum if not skip else torch.zeros_like(loss_sum), out, stop, overflow)

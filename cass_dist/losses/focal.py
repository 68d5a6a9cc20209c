"""Focal loss (Lin et al., 2017) for the three manifest tasks.

The original CASS code fed integer labels to a binary-cross-entropy focal loss, which made the loss
negative. Here targets always become probabilities first: one-hot for multi-class (softmax focal
loss), multi-hot for multi-label and 0/1 for binary (sigmoid focal loss). Every term is
``-w * (1 - p_t) ** gamma * log p_t`` with ``p_t`` in (0, 1], so the loss is never negative.

Three details decide fine-tuning numbers:

- ``1 - p_t`` is computed without cancellation (``-expm1(log p_t)``, ``sigmoid(-z)``), and its power
  has a zero gradient where it is 0: ``x ** gamma`` has an infinite derivative at 0 for
  ``0 < gamma < 1``, and autograd's ``inf * 0`` would turn a confident sample into NaN gradients.
- Per-class weights with ``reduction="mean"`` give a weighted mean, ``sum(w_i * l_i) / sum(w_i)``,
  exactly as ``F.cross_entropy(weight=)`` normalises (a float RetinaNet ``alpha`` keeps the plain mean).
- The value checks (targets in range, weights >= 0) read tensors on the host, a device sync; callers
  in a training loop run them once (``check_values=True`` on the first batch) and not every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cass_dist.errors import CassError

TASKS = ("multi-class", "multi-label", "binary")
REDUCTIONS = ("mean", "sum", "none")


class LossInputError(CassError, ValueError):
    """Logits, targets or weights given to a loss have the wrong shape, type or range."""


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    task: str,
    alpha: float | Sequence[float] | torch.Tensor | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
    check_values: bool = True,
) -> torch.Tensor:
    """Return the focal loss of ``logits`` against ``targets``.

    - ``multi-class``: logits N x C, targets class ids N; softmax focal loss on one-hot targets.
      ``alpha`` is a per-class weight (C values, e.g. the manifest's ``class_weights``) applied by
      the target class, or None.
    - ``multi-label``: logits N x C, targets 0/1 N x C; sigmoid focal loss per label. ``alpha`` is a
      float (weight of positives, negatives get ``1 - alpha``, as in RetinaNet) or C per-label weights.
    - ``binary``: logits N or N x 1, targets 0/1 N; sigmoid focal loss. ``alpha`` is a float as
      above or two class weights ``[w_negative, w_positive]``.

    ``reduction="mean"`` averages over samples (multi-class, binary) or over all N x C terms
    (multi-label, like ``binary_cross_entropy_with_logits``); with per-class weights it is the
    weighted mean (divided by the sum of the weights applied, as ``F.cross_entropy(weight=)``).
    ``"none"`` returns the weighted terms. With ``gamma=0`` it equals cross-entropy / BCE (with
    ``weight=``). ``check_values=False`` skips the checks that read values (a host sync), keeping
    those of shapes and types. Raises LossInputError on an unknown task or reduction, a negative
    gamma, targets of the wrong shape or range, or a mis-sized or negative alpha.
    """
    if task not in TASKS:
        raise LossInputError(f"focal_loss: task {task!r} is not one of {TASKS}")
    if reduction not in REDUCTIONS:
        raise LossInputError(f"focal_loss: reduction {reduction!r} is not one of {REDUCTIONS}")
    if gamma < 0:
        raise LossInputError(f"focal_loss: gamma must be >= 0, got {gamma}")
    logits = logits.float()
    if task == "multi-class":
        terms, weights = _softmax_focal(logits, targets, alpha, gamma, check_values)
    else:
        if task == "binary":
            logits, targets = _binary_shapes(logits, targets)
        terms, weights = _sigmoid_focal(logits, targets, alpha, gamma, task, check_values)
    if weights is not None:
        terms = terms * weights
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if weights is None:
        return terms.mean()
    # The weighted mean; a batch whose weights are all 0 (only zero-weight classes) has loss 0.
    return terms.sum() / weights.expand_as(terms).sum().clamp_min(torch.finfo(terms.dtype).tiny)


def _modulator(one_minus_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(1 - p_t) ** gamma`` with a zero gradient where ``1 - p_t`` is 0 (not autograd's inf * 0 = NaN)."""
    if gamma == 0:
        return torch.ones_like(one_minus_p)
    positive = one_minus_p > 0
    safe = torch.where(positive, one_minus_p, torch.ones_like(one_minus_p))
    return torch.where(positive, safe.pow(gamma), torch.zeros_like(one_minus_p))


def _softmax_focal(logits, targets, alpha, gamma, check_values):
    if logits.ndim != 2:
        raise LossInputError(f"focal_loss: multi-class logits must be N x C, got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if targets.ndim != 1 or targets.dtype.is_floating_point or len(targets) != len(logits):
        raise LossInputError(f"focal_loss: multi-class targets must be {len(logits)} integer class ids, "
                             f"got {targets.dtype} of shape {tuple(targets.shape)}")
    if check_values and targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise LossInputError(f"focal_loss: multi-class targets must lie in [0, {num_classes})")
    index = targets.long().unsqueeze(1)
    log_p_t = F.log_softmax(logits, dim=1).gather(1, index).squeeze(1)
    terms = -_modulator(-torch.expm1(log_p_t), gamma) * log_p_t
    if alpha is None:
        return terms, None
    if isinstance(alpha, (int, float)):
        raise LossInputError("focal_loss: multi-class alpha must be per-class weights (C values), not a float")
    return terms, _per_class(alpha, num_classes, logits, check_values)[index.squeeze(1)]


def _binary_shapes(logits, targets):
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1 or targets.shape != logits.shape:
        raise LossInputError(f"focal_loss: binary logits must be N or N x 1 and targets N, got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return logits, targets


def _sigmoid_focal(logits, targets, alpha, gamma, task, check_values):
    if targets.shape != logits.shape:
        raise LossInputError(f"focal_loss: {task} targets must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(targets.shape)}")
    targets = targets.to(logits.dtype)
    if check_values and targets.numel() and (targets.min() < 0 or targets.max() > 1):
        raise LossInputError(f"focal_loss: {task} targets must be 0/1 (or probabilities in [0, 1])")
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    # 1 - p_t = (1 - p) t + p (1 - t), with 1 - p = sigmoid(-z): no cancellation when p_t is near 1.
    one_minus_p_t = torch.sigmoid(-logits) * targets + torch.sigmoid(logits) * (1 - targets)
    terms = _modulator(one_minus_p_t, gamma) * bce
    if alpha is None:
        return terms, None
    if isinstance(alpha, (int, float)):
        if not 0 <= alpha <= 1:
            raise LossInputError(f"focal_loss: a float alpha weighs positives and must lie in [0, 1], got {alpha}")
        # RetinaNet's alpha re-balances positives and negatives; the mean stays a plain mean (torchvision's).
        return terms * (alpha * targets + (1 - alpha) * (1 - targets)), None
    if task == "binary":
        weights = _per_class(alpha, 2, logits, check_values)
        return terms, weights[1] * targets + weights[0] * (1 - targets)
    return terms, _per_class(alpha, logits.shape[1], logits, check_values)


def _per_class(alpha, num_classes: int, like: torch.Tensor, check_values: bool) -> torch.Tensor:
    weights = torch.as_tensor(alpha, dtype=like.dtype, device=like.device).flatten()
    if weights.numel() != num_classes:
        raise LossInputError(f"focal_loss: alpha has {weights.numel()} class weights, expected {num_classes}")
    if check_values and (weights < 0).any():
        raise LossInputError("focal_loss: class weights in alpha must be >= 0")
    return weights

"""Focal loss (Lin et al., 2017) for the three manifest tasks.

The original CASS code fed integer labels to a binary-cross-entropy focal loss, which made the loss
negative. Here targets always become probabilities first: one-hot for multi-class (softmax focal
loss), multi-hot for multi-label and 0/1 for binary (sigmoid focal loss). Every term is
``-w * (1 - p_t) ** gamma * log p_t`` with ``p_t`` in (0, 1], so the loss is never negative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

TASKS = ("multi-class", "multi-label", "binary")
REDUCTIONS = ("mean", "sum", "none")


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    task: str,
    alpha: float | Sequence[float] | torch.Tensor | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
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
    (multi-label, like ``binary_cross_entropy_with_logits``); ``"none"`` returns those terms.
    With ``gamma=0`` and no alpha it equals cross-entropy / BCE. Raises ValueError on an unknown
    task or reduction, a negative gamma, targets of the wrong shape or range, or a mis-sized alpha.
    """
    if task not in TASKS:
        raise ValueError(f"focal_loss: task {task!r} is not one of {TASKS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"focal_loss: reduction {reduction!r} is not one of {REDUCTIONS}")
    if gamma < 0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma}")
    logits = logits.float()
    if task == "multi-class":
        terms = _softmax_focal(logits, targets, alpha, gamma)
    else:
        if task == "binary":
            logits, targets = _binary_shapes(logits, targets)
        terms = _sigmoid_focal(logits, targets, alpha, gamma, task)
    if reduction == "mean":
        return terms.mean()
    return terms.sum() if reduction == "sum" else terms


def _softmax_focal(logits, targets, alpha, gamma):
    if logits.ndim != 2:
        raise ValueError(f"focal_loss: multi-class logits must be N x C, got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if targets.ndim != 1 or targets.dtype.is_floating_point or len(targets) != len(logits):
        raise ValueError(f"focal_loss: multi-class targets must be {len(logits)} integer class ids, "
                         f"got {targets.dtype} of shape {tuple(targets.shape)}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"focal_loss: multi-class targets must lie in [0, {num_classes})")
    one_hot = F.one_hot(targets.long(), num_classes).to(logits.dtype)
    log_p = F.log_softmax(logits, dim=1)
    terms = -(one_hot * (1 - log_p.exp()).pow(gamma) * log_p).sum(dim=1)
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            raise ValueError("focal_loss: multi-class alpha must be per-class weights (C values), not a float")
        weights = _per_class(alpha, num_classes, logits)
        terms = terms * (one_hot * weights).sum(dim=1)
    return terms


def _binary_shapes(logits, targets):
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1 or targets.shape != logits.shape:
        raise ValueError(f"focal_loss: binary logits must be N or N x 1 and targets N, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return logits, targets


def _sigmoid_focal(logits, targets, alpha, gamma, task):
    if targets.shape != logits.shape:
        raise ValueError(f"focal_loss: {task} targets must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}")
    targets = targets.to(logits.dtype)
    if targets.numel() and (targets.min() < 0 or targets.max() > 1):
        raise ValueError(f"focal_loss: {task} targets must be 0/1 (or probabilities in [0, 1])")
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    terms = (1 - p_t).pow(gamma) * bce
    if alpha is None:
        return terms
    if isinstance(alpha, (int, float)):
        if not 0 <= alpha <= 1:
            raise ValueError(f"focal_loss: a float alpha weighs positives and must lie in [0, 1], got {alpha}")
        return terms * (alpha * targets + (1 - alpha) * (1 - targets))
    if task == "binary":
        weights = _per_class(alpha, 2, logits)
        return terms * (weights[1] * targets + weights[0] * (1 - targets))
    return terms * _per_class(alpha, logits.shape[1], logits)


def _per_class(alpha, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    weights = torch.as_tensor(alpha, dtype=like.dtype, device=like.device).flatten()
    if weights.numel() != num_classes:
        raise ValueError(f"focal_loss: alpha has {weights.numel()} class weights, expected {num_classes}")
    if (weights < 0).any():
        raise ValueError("focal_loss: class weights in alpha must be >= 0")
    return weights

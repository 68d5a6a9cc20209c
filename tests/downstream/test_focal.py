"""Focal loss equals a hand computation and is never negative."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cass_dist.losses import focal_loss


def test_multiclass_equals_hand_computation_with_class_weights():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    targets = torch.tensor([0, 1])
    weights = [0.5, 2.0, 1.0]
    expected = []
    for row, t in zip(logits.tolist(), targets.tolist()):
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        expected.append(-weights[t] * (1 - p) ** 2 * math.log(p))
    got = focal_loss(logits, targets, task="multi-class", alpha=weights, gamma=2.0, reduction="none")
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert focal_loss(logits, targets, task="multi-class", alpha=weights).item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_sigmoid_tasks_equal_hand_computation():
    logits = torch.tensor([[1.5, -0.3], [-2.0, 0.7]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = []
    for row, trow in zip(logits.tolist(), targets.tolist()):
        for z, t in zip(row, trow):
            p = 1 / (1 + math.exp(-z))
            p_t = p if t else 1 - p
            expected.append((0.25 if t else 0.75) * -((1 - p_t) ** 2) * math.log(p_t))
    got = focal_loss(logits, targets, task="multi-label", alpha=0.25, reduction="none")
    assert got.flatten().tolist() == pytest.approx(expected, rel=1e-5)
    binary = focal_loss(logits[:, 0], targets[:, 0].long(), task="binary", alpha=0.25, reduction="none")
    assert binary.tolist() == pytest.approx([expected[0], expected[2]], rel=1e-5)


def test_gamma_zero_is_cross_entropy_and_bce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g)
    labels = torch.randint(0, 5, (16,), generator=g)
    multi_hot = (torch.rand(16, 5, generator=g) > 0.5).float()
    assert focal_loss(logits, labels, task="multi-class", gamma=0).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, multi_hot)
    assert focal_loss(logits, multi_hot, task="multi-label", gamma=0).item() == pytest.approx(bce.item(), rel=1e-6)


@pytest.mark.parametrize("task", ["multi-class", "multi-label", "binary"])
def test_positive_for_every_target_type(task):
    # The original code fed integer labels to a BCE focal loss and got negative losses.
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(64, 3, generator=g)
    if task == "multi-class":
        targets = torch.randint(0, 3, (64,), generator=g)
    elif task == "multi-label":
        targets = (torch.rand(64, 3, generator=g) > 0.5).float()
    else:
        logits, targets = logits[:, :1], torch.randint(0, 2, (64,), generator=g)
    terms = focal_loss(logits, targets, task=task, reduction="none")
    assert (terms >= 0).all() and focal_loss(logits, targets, task=task) > 0


def test_bad_inputs_raise():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="class ids"):
        focal_loss(logits, torch.zeros(4, 3), task="multi-class")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        focal_loss(logits, torch.tensor([0, 1, 2, 3]), task="multi-class")
    with pytest.raises(ValueError, match="0/1"):
        focal_loss(logits, torch.full((4, 3), 2.0), task="multi-label")
    with pytest.raises(ValueError, match="class weights"):
        focal_loss(logits, torch.tensor([0, 1, 2, 0]), task="multi-class", alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="task"):
        focal_loss(logits, torch.tensor([0, 1, 2, 0]), task="regression")

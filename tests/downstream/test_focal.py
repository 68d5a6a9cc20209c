"""Focal loss equals a hand computation and is never negative."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cass_dist.losses import focal_loss
from cass_dist.losses.focal import LossInputError


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
    # The mean is weighted, as F.cross_entropy(weight=): divided by the targets' weights (0.5 + 2.0).
    mean = focal_loss(logits, targets, task="multi-class", alpha=weights).item()
    assert mean == pytest.approx(sum(expected) / 2.5, rel=1e-5)


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


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.9])
def test_no_nan_gradients_for_gamma_below_one_at_confident_samples(gamma):
    # (1 - p_t) ** gamma has an infinite derivative at p_t = 1; autograd's inf * 0 used to give NaN.
    cases = [
        ("multi-class", torch.tensor([[200.0, 0.0, 0.0], [0.0, 30.0, -30.0], [0.5, 0.2, 0.1]]), torch.tensor([0, 1, 2])),
        ("binary", torch.tensor([200.0, -200.0, 40.0, 0.3]), torch.tensor([1, 0, 1, 0])),
        ("multi-label", torch.tensor([[200.0, -200.0], [35.0, 0.1]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])),
    ]
    for task, logits, targets in cases:
        logits = logits.clone().requires_grad_()
        loss = focal_loss(logits, targets, task=task, gamma=gamma)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), (task, logits.grad)


@pytest.mark.parametrize("task", ["multi-class", "multi-label", "binary"])
def test_gradients_equal_a_float64_reference_where_p_t_is_below_one(task):
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    if task == "multi-class":
        targets = torch.randint(0, 3, (8,), generator=g)
        p_t = logits.softmax(1).gather(1, targets[:, None])[:, 0]
        reference = lambda z: (-(1 - z.softmax(1).gather(1, targets[:, None])[:, 0]) ** 0.5 *  # noqa: E731
                               z.log_softmax(1).gather(1, targets[:, None])[:, 0]).mean()
    else:
        if task == "binary":
            logits, targets = logits[:, 0], torch.randint(0, 2, (8,), generator=g)
        else:
            targets = (torch.rand(8, 3, generator=g) > 0.5).long()
        p_t = torch.where(targets.bool(), logits.sigmoid(), 1 - logits.sigmoid())

        def reference(z):
            q = torch.where(targets.bool(), z.sigmoid(), 1 - z.sigmoid())
            return (-(1 - q) ** 0.5 * q.log()).mean()
    assert (p_t < 1).all()
    ours = logits.float().clone().requires_grad_()
    focal_loss(ours, targets, task=task, gamma=0.5).backward()
    ref = logits.clone().requires_grad_()
    reference(ref).backward()
    torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)


def test_class_weights_give_the_weighted_mean_of_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(32, 4, generator=g)
    labels = torch.randint(0, 4, (32,), generator=g)
    weights = [0.2, 1.0, 3.0, 0.8]
    expected = F.cross_entropy(logits, labels, weight=torch.tensor(weights))
    assert focal_loss(logits, labels, task="multi-class", alpha=weights, gamma=0).item() == pytest.approx(
        expected.item(), rel=1e-6)
    # Binary with [w_negative, w_positive]: a one-logit sigmoid is a softmax over [0, z].
    z = torch.randn(32, generator=g)
    y = torch.randint(0, 2, (32,), generator=g)
    expected = F.cross_entropy(torch.stack([torch.zeros_like(z), z], 1), y, weight=torch.tensor([0.4, 1.6]))
    assert focal_loss(z, y, task="binary", alpha=[0.4, 1.6], gamma=0).item() == pytest.approx(expected.item(), rel=1e-6)
    # Multi-label with per-label weights: the weighted mean over every (sample, label) term.
    multi_hot = (torch.rand(32, 4, generator=g) > 0.5).float()
    w = torch.tensor(weights)
    bce = F.binary_cross_entropy_with_logits(logits, multi_hot, weight=w, reduction="sum") / (32 * w.sum())
    assert focal_loss(logits, multi_hot, task="multi-label", alpha=weights, gamma=0).item() == pytest.approx(
        bce.item(), rel=1e-6)
    # A float alpha (RetinaNet's) keeps the plain mean, as torchvision's sigmoid_focal_loss.
    from torchvision.ops import sigmoid_focal_loss
    tv = sigmoid_focal_loss(logits, multi_hot, alpha=0.25, gamma=2, reduction="mean")
    assert focal_loss(logits, multi_hot, task="multi-label", alpha=0.25).item() == pytest.approx(tv.item(), rel=1e-5)


class _SyncCounter:
    """Counts the tensor reads that sync a device with the host: .item(), bool(), .tolist()."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("item", "__bool__", "tolist"):
            real = getattr(torch.Tensor, name)

            def counted(tensor, *args, _real=real, **kwargs):
                self.calls += 1
                return _real(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("task", ["multi-class", "multi-label", "binary"])
def test_value_checks_can_leave_the_step_and_still_catch_bad_targets_where_they_run(task, monkeypatch):
    logits = torch.randn(6, 3)
    good = {"multi-class": torch.tensor([0, 1, 2, 0, 1, 2]), "multi-label": (torch.rand(6, 3) > 0.5).float(),
            "binary": torch.tensor([0, 1, 1, 0, 1, 0])}[task]
    bad = {"multi-class": torch.tensor([0, 1, 5, 0, 1, 2]), "multi-label": torch.full((6, 3), 3.0),
           "binary": torch.tensor([0, 1, 2, 0, 1, 0])}[task]
    if task == "binary":
        logits = logits[:, 0]
    alpha = torch.ones(2 if task == "binary" else 3)
    counter = _SyncCounter(monkeypatch)
    focal_loss(logits, good, task=task, alpha=alpha, check_values=False)
    assert counter.calls == 0
    focal_loss(logits, good, task=task, alpha=alpha)
    assert counter.calls > 0  # the checks read values: why they leave the hot loop
    with pytest.raises(LossInputError, match="targets must"):
        focal_loss(logits, bad, task=task, alpha=alpha)
    with pytest.raises(LossInputError, match=">= 0"):
        focal_loss(logits, good, task=task, alpha=-alpha)


@pytest.mark.parametrize("loss, class_weights", [("ce", False), ("focal", True)], ids=["default", "focal-weighted"])
def test_the_finetuning_loss_checks_the_first_batch_and_then_never_syncs(monkeypatch, loss, class_weights):
    from types import SimpleNamespace

    from cass_dist.configs.finetune import FinetuneConfig
    from cass_dist.engine.finetune import FinetuneLoss

    cfg = FinetuneConfig()
    assert (cfg.loss.name, cfg.loss.class_weights) == ("ce", False)  # the defaults
    cfg.loss.name, cfg.loss.class_weights = loss, class_weights
    manifest = SimpleNamespace(task="multi-class", class_weights=[0.5, 1.0, 1.5])
    loss_fn = FinetuneLoss(cfg, manifest, "cpu")
    with pytest.raises(LossInputError, match=r"\[0, 3\)"):
        loss_fn({"cnn": torch.randn(4, 3)}, torch.tensor([0, 1, 2, 3]))
    loss_fn = FinetuneLoss(cfg, manifest, "cpu")
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    first = loss_fn({"cnn": logits}, labels)
    weights = torch.tensor(manifest.class_weights) if class_weights else None
    expected = focal_loss(logits, labels, task="multi-class", alpha=weights, gamma=2.0 if loss == "focal" else 0.0)
    torch.testing.assert_close(first, expected)
    counter = _SyncCounter(monkeypatch)
    for _ in range(3):
        loss_value = loss_fn({"cnn": torch.randn(4, 3), "vit": torch.randn(4, 3)}, labels)
    assert counter.calls == 0 and loss_value.ndim == 0

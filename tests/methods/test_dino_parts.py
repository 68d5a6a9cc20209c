"""DINO's pieces on hand cases: the loss, the centre, the schedules, the EMA teacher, clipping and the freeze."""

import math

import pytest
import torch

from cass_dist.configs.base import ConfigError
from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.losses.dino import DINOLoss, cosine_to_one, warmup_linear
from cass_dist.methods import build_method


def softmax(xs):
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def test_loss_is_the_cross_entropy_of_every_student_crop_against_every_other_teacher_crop():
    teacher = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]]  # two global crops, one sample, K = 3
    student = [[0.3, -0.2, 0.1], [0.0, 0.4, -0.4], [0.2, 0.2, -0.1]]  # the two global crops + one local
    centre, t_temp, s_temp = [0.1, -0.1, 0.0], 0.5, 0.1
    loss_fn = DINOLoss(3, student_temp=s_temp, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([centre]))
    out = loss_fn([torch.tensor([s]) for s in student], [torch.tensor([t]) for t in teacher], t_temp)

    expected, terms = 0.0, 0
    for i, t in enumerate(teacher):
        q = softmax([(a - c) / t_temp for a, c in zip(t, centre)])
        for v, s in enumerate(student):
            if v != i:  # never the teacher's own view
                log_p = [math.log(p) for p in softmax([a / s_temp for a in s])]
                expected += -sum(qk * lk for qk, lk in zip(q, log_p))
                terms += 1
    assert terms == 4
    assert out["loss"].item() == pytest.approx(expected / terms, rel=1e-5)
    # the centre moved to 0.9 * centre + 0.1 * the mean of the teacher outputs
    mean = [(a + b) / 2 for a, b in zip(*teacher)]
    assert loss_fn.center[0].tolist() == pytest.approx([0.9 * c + 0.1 * m for c, m in zip(centre, mean)], rel=1e-6)
    q0 = softmax([(a - c) / t_temp for a, c in zip(teacher[0], centre)])
    assert out["teacher_probs"][0].tolist() == pytest.approx(q0, rel=1e-5)


def test_without_centring_the_centre_is_not_subtracted():
    teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    student = [torch.zeros(1, 2)] * 2
    with_centre, without = DINOLoss(2), DINOLoss(2, centering=False)
    for loss_fn in (with_centre, without):
        loss_fn.center.fill_(5.0)
        loss_fn.center[0, 1] = -5.0
    probs_with = with_centre(student, list(teacher), 1.0)["teacher_probs"]
    probs_without = without(student, list(teacher), 1.0)["teacher_probs"]
    torch.testing.assert_close(probs_without, torch.softmax(teacher[0], -1))
    torch.testing.assert_close(probs_with, torch.softmax(teacher[0] - torch.tensor([[5.0, -5.0]]), -1))


def test_a_non_finite_teacher_batch_leaves_the_centre_alone():
    loss_fn = DINOLoss(2)
    loss_fn.center.fill_(0.5)
    loss_fn([torch.zeros(1, 2)] * 2, [torch.tensor([[float("inf"), 0.0]]), torch.zeros(1, 2)], 0.1)
    assert torch.isfinite(loss_fn.center).all() and loss_fn.center[0, 1].item() == pytest.approx(0.45)


def test_schedules_follow_dino():
    # momentum: base at step 0, half way up the cosine at mid-run, 1 at the end
    assert cosine_to_one(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_to_one(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_to_one(0.996, 100, 100) == pytest.approx(1.0)
    # teacher temperature: linear warmup, then constant
    assert [warmup_linear(0.04, 0.07, s, 3) for s in (0, 1, 2, 3, 9)] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07])


def tiny_dino(*extra):
    return parse_pretrain_config(["--data", "unused", "--method", "dino", "--vit", "test_vit", "--cnn", "test_resnet",
                                  "--model.vit_patch_size", "8", "--image-size", "32", "--dino.hidden_dim", "32",
                                  "--dino.bottleneck_dim", "16", "--dino.out_dim", "64", *extra])


def test_teacher_follows_the_student_by_ema_with_the_scheduled_momentum():
    torch.manual_seed(0)
    method = build_method(tiny_dino("--dino.momentum_teacher", "0.9"))
    student = method._student_params()
    teacher = method._teacher_params()
    assert all(torch.equal(s, t) for s, t in zip(student, teacher))  # the teacher starts as the student
    with torch.no_grad():
        for s, t in zip(student, teacher):
            s.fill_(1.0)
            t.fill_(0.0)
    method.after_step(5, 10)  # momentum 1 - 0.1 * (1 + cos(pi / 2)) / 2 = 0.95
    assert all(torch.allclose(t, torch.full_like(t, 0.05)) for t in teacher)
    method.after_step(10, 10)  # momentum 1 at the end: the teacher stays
    assert all(torch.allclose(t, torch.full_like(t, 0.05)) for t in teacher)
    assert not any(p.requires_grad for p in teacher)


def views(n_local=1, size=32, local=16):
    return [torch.randn(4, 3, size, size) for _ in range(2)] + [torch.randn(4, 3, local, local) for _ in range(n_local)]


def test_each_student_parameter_gradient_is_clipped_to_clip_grad_before_the_step():
    torch.manual_seed(0)
    method = build_method(tiny_dino("--dino.clip_grad", "0.5", "--dino.freeze_last_layer", "0"))
    params = [p for p in method._student_params() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    method.attach_optimizer(optimizer)
    (1e3 * method(views(), global_step=0, total_steps=10)["loss"]).backward()
    grads = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    optimizer.step()
    for p, b, g in zip(params, before, grads):
        expected = g * min(1.0, 0.5 / (g.norm().item() + 1e-6))
        torch.testing.assert_close(b - p.detach(), expected, rtol=1e-4, atol=1e-7)
    assert max(g.norm().item() for g in grads) > 0.5  # the premise: clipping had something to clip


def test_last_layer_is_frozen_for_the_first_part_of_the_run_only():
    torch.manual_seed(0)
    method = build_method(tiny_dino("--dino.freeze_last_layer", "0.3", "--dino.norm_last_layer", "false"))
    optimizer = torch.optim.AdamW([g for g in method.optimizer_groups(tiny_dino().optim)], lr=1e-2)
    method.attach_optimizer(optimizer)
    last = list(method.student_head.last_layer.parameters())
    assert len(last) == 2  # weight-norm scale and direction, both trainable with norm_last_layer false

    def step(global_step):
        before = [p.detach().clone() for p in last]
        optimizer.zero_grad()
        method(views(), global_step=global_step, total_steps=10)["loss"].backward()
        optimizer.step()
        return [not torch.equal(b, p) for b, p in zip(before, last)]

    assert step(2) == [False, False]  # step 2 of 10 < 0.3 of the run: no update, no weight decay
    assert step(3) == [True, True]



def test_deepspeed_with_per_parameter_clipping_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"dino\.clip_grad, dino\.freeze_last_layer"):
        build_method(tiny_dino())
    build_method(tiny_dino("--dino.clip_grad", "0", "--dino.freeze_last_layer", "0"))  # nothing to refuse

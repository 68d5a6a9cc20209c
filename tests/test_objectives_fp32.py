"""Objectives compute in fp32 with autocast off: under CPU bf16 autocast the loss (and every term) is fp32
and equal to the same computation on fp32 inputs outside autocast."""

import pytest
import torch

from cass_dist.losses import OBJECTIVES, build_objective


def bf16_embeddings():
    """Embeddings as a bf16 run's heads produce them: the output of a Linear under bf16 autocast."""
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 32)
    x = torch.randn(16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_cnn, z_vit = head(x), head(x.flip(0) + 0.1)
    assert z_cnn.dtype == torch.bfloat16
    return z_cnn, z_vit


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_under_bf16_autocast_is_fp32_and_equals_the_fp32_computation(name):
    z_cnn, z_vit = bf16_embeddings()
    objective = build_objective(name, embed_dim=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = objective(z_cnn, z_vit)
    outside = objective(z_cnn.float(), z_vit.float())
    assert inside.keys() == outside.keys()
    for key, value in inside.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, outside[key]), key  # bit for bit: no op of the objective ran in bf16


def test_without_the_fp32_guard_autocast_would_change_the_result():
    """The premise of the test above: CPU autocast does run these matmuls in bf16."""
    z_cnn, z_vit = (z.float() for z in bf16_embeddings())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        corr = z_cnn.T @ z_vit
    assert corr.dtype == torch.bfloat16 and not torch.equal(corr.float(), z_cnn.T @ z_vit)

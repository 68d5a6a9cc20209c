"""CASS objectives: the paper loss against a hand computation, and what each candidate term does."""

import pytest
import torch

from cass_dist.losses import OBJECTIVES, build_objective, cass_loss
from cass_dist.losses.cass import covariance_term, standardise, variance_term


def test_paper_loss_and_gradients_match_hand_computation():
    # Row 0: orthogonal (cos 0, loss 2); row 1: parallel (cos 1, loss 0). Batch mean = 1.
    z_cnn = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z_vit = torch.tensor([[0.0, 1.0], [2.0, 2.0]], requires_grad=True)
    loss = cass_loss(z_cnn, z_vit)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    # d/da (2 - 2cos)/B = -(2/B) * (b/(|a||b|) - cos * a/|a|^2); row 0: a=[1,0], b=[0,1], cos=0.
    torch.testing.assert_close(z_cnn.grad, torch.tensor([[0.0, -1.0], [0.0, 0.0]]))
    torch.testing.assert_close(z_vit.grad, torch.tensor([[-1.0, 0.0], [0.0, 0.0]]))


def test_paper_loss_is_fp32_and_has_no_stop_gradient():
    z_cnn = torch.randn(8, 16, dtype=torch.float16, requires_grad=True)
    z_vit = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    loss = cass_loss(z_cnn, z_vit)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z_cnn.grad.abs().sum() > 0 and z_vit.grad.abs().sum() > 0


def test_paper_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape \[B, D\]"):
        cass_loss(torch.randn(4, 8), torch.randn(4, 9))


def test_paper_objective_returns_the_paper_loss():
    z_cnn, z_vit = torch.randn(6, 10), torch.randn(6, 10)
    out = build_objective("paper", embed_dim=10)(z_cnn, z_vit)
    torch.testing.assert_close(out["loss"], cass_loss(z_cnn, z_vit))


def test_variance_and_covariance_terms_punish_collapse_not_spread():
    torch.manual_seed(0)
    healthy = standardise(torch.randn(512, 32))
    collapsed = standardise(torch.ones(512, 32) + 1e-4 * torch.randn(512, 32))
    assert variance_term(healthy) < 0.1 < 0.9 < variance_term(collapsed)
    correlated = standardise(torch.randn(512, 1).expand(512, 32) + 0.1 * torch.randn(512, 32))
    assert covariance_term(healthy) < 0.1 * covariance_term(correlated)


def test_vicreg_objective_is_paper_loss_plus_weighted_terms():
    z_cnn, z_vit = torch.randn(16, 12), torch.randn(16, 12)
    obj = build_objective("vicreg", embed_dim=12, sim_weight=1.0, var_weight=2.0, cov_weight=0.5)
    out = obj(z_cnn, z_vit)
    expected = out["loss_cos"] + 2.0 * out["loss_var"] + 0.5 * out["loss_cov"]
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["loss_cos"], cass_loss(z_cnn, z_vit))


def test_barlow_is_minimal_for_identical_decorrelated_branches():
    torch.manual_seed(0)
    z = torch.linalg.qr(torch.randn(64, 8))[0] * 8.0  # orthogonal, zero-mean-ish columns
    z = z - z.mean(dim=0)
    obj = build_objective("barlow", embed_dim=8)
    same = obj(z, z)["loss"]
    unrelated = obj(z, torch.randn(64, 8))["loss"]
    assert same < 0.05 < unrelated


def test_simsiam_stops_gradient_into_the_target_branch():
    torch.manual_seed(0)
    obj = build_objective("simsiam", embed_dim=8, pred_hidden_dim=4)
    for p in obj.predictor_vit.parameters():
        p.requires_grad_(False)
    z_cnn = torch.randn(16, 8, requires_grad=True)
    z_vit = torch.randn(16, 8, requires_grad=True)
    # Only the term predicting from the CNN depends on z_cnn; z_vit is its detached target.
    obj(z_cnn, z_vit)["loss"].backward()
    z_cnn_only = z_cnn.grad.clone()
    z_cnn.grad = None
    z_vit.grad = None
    (0.5 * cass_loss(obj.predictor_cnn(z_cnn), z_vit.detach())).backward()
    torch.testing.assert_close(z_cnn.grad, z_cnn_only)
    groups = obj.branch_parameters()
    assert {n.split(".")[0] for n, _ in groups["cnn"]} == {"predictor_cnn"}
    assert {n.split(".")[0] for n, _ in groups["vit"]} == {"predictor_vit"}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_gives_a_finite_fp32_loss_with_gradients(name):
    z_cnn = torch.randn(8, 16, requires_grad=True)
    z_vit = torch.randn(8, 16, requires_grad=True)
    out = build_objective(name, embed_dim=16)(z_cnn, z_vit)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert all(v.ndim == 0 and not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert z_cnn.grad is not None and z_cnn.grad.abs().sum() > 0


def test_build_objective_rejects_unknown_names_and_keywords():
    with pytest.raises(ValueError, match="unknown objective 'byol'"):
        build_objective("byol", embed_dim=8)
    with pytest.raises(ValueError, match="'vicreg' does not take"):
        build_objective("vicreg", embed_dim=8, temperature=0.1)

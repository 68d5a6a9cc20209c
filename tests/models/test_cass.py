"""The CASS pair and its pretraining module: shapes, parameter groups, checkpointing, and no collapse."""

import pytest
import torch

from cass_dist.losses import DEFAULT_OBJECTIVE, build_objective
from cass_dist.models import CASS, CASSPretrainer
from cass_dist.monitor import CollapseMonitor, embedding_stats


def _tiny(**kwargs):
    # timm's stem, not the 32 px default small stem: these tests are about the pair and its objectives,
    # and the stride-1 stem makes the training tests 3x slower (the stem: test_small_images.py).
    kwargs.setdefault("small_stem", False)
    return CASS("test_resnet", "test_vit", img_size=32, vit_patch_size=4, **kwargs)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_forward_gives_two_embeddings_of_the_shared_size(head):
    model = _tiny(embed_dim=32, head=head, proj_hidden_dim=64)
    z_cnn, z_vit = model(torch.randn(4, 3, 32, 32))
    assert z_cnn.shape == z_vit.shape == (4, 32)
    f_cnn, f_vit = model.features(torch.randn(4, 3, 32, 32))
    assert f_cnn.shape == (4, model.cnn.num_features) and f_vit.shape == (4, model.vit.num_features)


def test_the_vit_can_see_its_own_view():
    model = _tiny(embed_dim=16, head="mlp", proj_hidden_dim=32).eval()
    images, other = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    z_cnn, z_vit = model(images, other)
    same_cnn, _ = model(images)
    _, other_vit = model(other)
    assert torch.equal(z_cnn, same_cnn) and torch.equal(z_vit, other_vit)


def test_paper_default_head_is_the_1000_way_timm_classifier():
    model = _tiny()
    assert model.embed_dim == 1000 and model.cnn.get_classifier().out_features == 1000
    assert isinstance(model.cnn_head, torch.nn.Identity)


def test_param_groups_cover_every_parameter_once_per_branch():
    pretrainer = CASSPretrainer(_tiny(embed_dim=16), build_objective("simsiam", embed_dim=16))
    groups = pretrainer.param_groups(lr_cnn=1e-3, lr_vit=5e-4, weight_decay_cnn=0.1, weight_decay_vit=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(pretrainer.parameters()))
    by_id = {id(p): g for g in groups for p in g["params"]}
    vit, objective = pretrainer.model.vit, pretrainer.objective
    assert by_id[id(vit.pos_embed)]["weight_decay"] == 0.0 and by_id[id(vit.pos_embed)]["name"] == "vit"
    assert by_id[id(vit.patch_embed.proj.weight)]["weight_decay"] == 0.05
    assert by_id[id(vit.patch_embed.proj.bias)]["weight_decay"] == 0.0
    assert by_id[id(objective.predictor_cnn[0].weight)] == next(
        g for g in groups if g["name"] == "cnn" and not g["no_decay"])
    assert {g["lr"] for g in groups if g["name"] == "vit"} == {5e-4}
    torch.optim.AdamW(groups)  # accepted as is


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    pretrainer = CASSPretrainer(_tiny(embed_dim=16), build_objective("paper", embed_dim=16)).eval()
    images = torch.randn(4, 3, 32, 32)

    def grads():
        pretrainer.zero_grad()
        pretrainer(images)["loss"].backward()
        return {n: p.grad.clone() for n, p in pretrainer.named_parameters()}

    plain = grads()
    pretrainer.model.set_grad_checkpointing(True)
    assert pretrainer.model.vit.grad_checkpointing and pretrainer.model.cnn.grad_checkpointing
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def _patterned_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images from 4 families (gratings of different orientation), like the synthetic set."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    family = torch.randint(0, 4, (n,), generator=generator)
    angle = family.float() * torch.pi / 4 + 0.2 * torch.randn(n, generator=generator)
    freq = 3 + 4 * torch.rand(n, generator=generator)
    phase = torch.rand(n, generator=generator) * 6.28
    wave = torch.sin(freq[:, None, None] * 6.28 * (torch.cos(angle)[:, None, None] * xx
                                                     + torch.sin(angle)[:, None, None] * yy) + phase[:, None, None])
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    return wave[:, None] * colour + 0.1 * torch.randn(n, 3, 32, 32, generator=generator)


def _train(objective: str, steps: int, head: str = "linear"):
    """Train the tiny pair on patterned images; returns (losses, monitor warnings, last z_cnn, last z_vit)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = _patterned_images(256, generator)
    model = _tiny(embed_dim=64, head=head, proj_hidden_dim=128)
    pretrainer = CASSPretrainer(model, build_objective(objective, embed_dim=64))
    optimizer = torch.optim.AdamW(
        pretrainer.param_groups(lr_cnn=1e-3, lr_vit=1e-3, weight_decay_cnn=0.05, weight_decay_vit=0.05)
    )
    monitor, warnings, losses = CollapseMonitor(), [], []
    for _ in range(steps):
        batch = images[torch.randint(0, 256, (64,), generator=generator)]
        batch = torch.where(torch.rand(64, 1, 1, 1, generator=generator) < 0.5, batch.flip(-1), batch)
        out = pretrainer(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
        warnings.append(monitor.update(embedding_stats(out["z_cnn"]), embedding_stats(out["z_vit"])))
    return losses, [w for w in warnings if w], out["z_cnn"], out["z_vit"]


def test_default_objective_loss_falls_without_collapse():
    # The recommended setup (docs/objectives.md): the default objective with projector heads.
    losses, _, z_cnn, z_vit = _train(DEFAULT_OBJECTIVE, steps=40, head="mlp")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    monitor = CollapseMonitor()
    for z in (z_cnn, z_vit):
        stats = embedding_stats(z)
        assert not monitor.is_collapsed(stats), stats
        assert stats["std"] > 0.2 / 64**0.5, stats


def test_paper_objective_collapses_and_the_monitor_says_so():
    # The contrast that makes the test above meaningful: same data, same model, the paper's loss.
    losses, warnings, _, z_vit = _train("paper", steps=20)
    assert losses[-1] < 0.2 * losses[0]
    assert any("vit" in w for w in warnings)
    assert CollapseMonitor().is_collapsed(embedding_stats(z_vit))

"""CASS behind the method contract: views[0] to the CNN, views[-1] to the ViT, the same groups and exports."""

import torch

from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.methods import CASSMethod, build_method
from cass_dist.models import CASSPretrainer


def tiny_cass(*extra):
    return parse_pretrain_config(["--data", "unused", "--cnn", "test_resnet", "--vit", "test_vit",
                                  "--model.vit_patch_size", "8", "--image-size", "32", "--embed-dim", "16",
                                  "--model.proj_hidden_dim", "32", "--model.channels_last", "false", *extra])


def test_views_go_first_to_the_cnn_and_last_to_the_vit_as_in_cass_pretrainer():
    torch.manual_seed(0)
    method = build_method(tiny_cass()).eval()
    assert isinstance(method, CASSMethod) and isinstance(method, CASSPretrainer)
    a, b, c = (torch.randn(4, 3, 32, 32) for _ in range(3))
    out = method([a, b, c], global_step=3, total_steps=10)
    reference = CASSPretrainer.forward(method, a, c)
    for key in ("loss", "z_cnn", "z_vit"):
        torch.testing.assert_close(out[key], reference[key])
    torch.testing.assert_close(method(a)["z_vit"], CASSPretrainer.forward(method, a, a)["z_vit"])  # a tensor: shared


def test_optimizer_groups_are_the_per_branch_groups_and_exports_hold_both_branches():
    cfg = tiny_cass("--lr-cnn", "2e-3", "--lr-vit", "5e-4", "--optim.weight_decay_vit", "0.05")
    method = build_method(cfg)
    groups = method.optimizer_groups(cfg.optim, world_size=4)  # CASS does not scale its lr with the world
    assert {g["name"]: g["lr"] for g in groups} == {"cnn": 2e-3, "vit": 5e-4}
    assert sum(len(g["params"]) for g in groups) == len([p for p in method.parameters() if p.requires_grad])
    backbones, description = method.export_parts()
    assert list(backbones) == ["cnn", "vit"] and description["method"] == "cass"
    assert description["cnn"]["name"] == "test_resnet" and method.view_transform(None) is None

"""Backbones fit for small images: the small CNN stem, the ViT patch-size rule, and exports that keep them."""

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.models import (
    CASS,
    BackboneError,
    build_from_spec,
    create_backbone,
    export_backbones,
    load_backbone,
    plan_backbone,
    read_export_info,
)
from cass_dist.models.small_images import MIN_VIT_TOKENS, SMALL_IMAGE_MAX_PX, vit_patch_size


def _grid(model, size):
    with torch.no_grad():
        return tuple(model.eval().forward_features(torch.zeros(1, 3, size, size)).shape[-2:])


def test_small_stem_is_the_default_at_64_px_and_below_and_keeps_resnet18_spatial():
    timm_stem = create_backbone("resnet18", num_classes=0)
    assert _grid(timm_stem, 28) == (1, 1)  # what the issue measured: 28 px ends in a 1x1 map

    spec = plan_backbone("resnet18", num_classes=0, img_size=28)
    assert spec.small_stem and spec.to_dict() == {"name": "resnet18", "timm_kwargs": {"num_classes": 0},
                                                  "small_stem": True}
    small = build_from_spec(spec)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert _grid(small, 28) == (4, 4)  # MedMNIST v2's ResNet-18 (28): 28 -> 28, 14, 7, 4
    assert plan_backbone("resnet18", num_classes=0, img_size=SMALL_IMAGE_MAX_PX).small_stem
    assert not plan_backbone("resnet18", num_classes=0, img_size=SMALL_IMAGE_MAX_PX + 1).small_stem
    assert not plan_backbone("resnet18", num_classes=0, img_size=28, small_stem=False).small_stem
    assert plan_backbone("resnet18", num_classes=0, img_size=224, small_stem=True).small_stem


def test_the_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="cass_dist"):
        plan_backbone("resnet18", num_classes=0, img_size=28)
        plan_backbone("vit_tiny_patch16_224", num_classes=0, img_size=28)
    text = caplog.text
    assert "resnet18: small stem" in text and "28 px <= 64" in text
    assert "patch size 7 instead of its own 16" in text


def test_deep_stems_and_conv_stems_lose_their_stride_and_keep_their_weights():
    deep = create_backbone("test_resnet", num_classes=0, small_stem=True)  # a 3-conv deep stem
    assert deep.conv1[0].stride == (1, 1) and isinstance(deep.maxpool, torch.nn.Identity)
    plain = create_backbone("test_resnet", num_classes=0)
    assert {k: v.shape for k, v in deep.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    efficient = create_backbone("efficientnet_b0", num_classes=0, small_stem=True)
    assert efficient.conv_stem.stride == (1, 1) and _grid(efficient, 32) == (2, 2)


def test_models_without_an_adaptable_stem_are_refused_when_asked_and_left_alone_by_default():
    with pytest.raises(BackboneError, match=r"model.small_stem: timm model 'convnext_atto' \(ConvNeXt\) has no stem"):
        plan_backbone("convnext_atto", num_classes=0, img_size=28, small_stem=True)
    kept = plan_backbone("convnext_atto", num_classes=0, img_size=28)
    assert not kept.small_stem and "keeps its own stem" in kept.notes[0]
    with pytest.raises(BackboneError, match="patch model"):
        plan_backbone("vit_tiny_patch16_224", num_classes=0, img_size=28, small_stem=True)


@pytest.mark.parametrize("size, patch", [(28, 7), (32, 8), (48, 12), (64, 16), (224, 16), (30, 6)])
def test_vit_patch_rule_gives_at_least_16_tokens(size, patch):
    spec = plan_backbone("vit_tiny_patch16_224", num_classes=0, img_size=size)
    assert spec.timm_kwargs["img_size"] == size and spec.timm_kwargs["patch_size"] == patch
    assert (size // patch) ** 2 >= MIN_VIT_TOKENS
    vit = build_from_spec(spec)
    assert vit.patch_embed.num_patches == (size // patch) ** 2
    assert vit(torch.zeros(2, 3, size, size)).shape == (2, vit.num_features)


def test_vit_rule_takes_the_largest_patch_giving_16_tokens_for_every_small_size():
    vit = timm.create_model("test_vit")  # patch 16: plan_backbone's rule is vit_patch_size
    for size in range(8, 97):
        patch, _ = vit_patch_size(vit, size, None)
        own = 16
        assert 1 <= patch <= own
        if patch < own:  # reduced only when the model's own gives too few tokens, and no more than needed
            assert (size // own) ** 2 < MIN_VIT_TOKENS
            assert (size // patch) ** 2 >= MIN_VIT_TOKENS or patch == 1
            bigger = [p for p in range(patch + 1, own) if (size // p) ** 2 >= MIN_VIT_TOKENS and size % p == 0]
            assert not bigger, (size, patch, bigger)
    assert plan_backbone("test_vit", num_classes=0, img_size=28, patch_size=4).timm_kwargs["patch_size"] == 4
    # User keywords win over the rule.
    assert plan_backbone("test_vit", num_classes=0, img_size=28,
                         extra_kwargs={"patch_size": 14}).timm_kwargs["patch_size"] == 14


def test_pretraining_config_defaults_to_the_rules():
    cfg = parse_pretrain_config(["--data", "x", "--image-size", "28", "--cnn", "resnet18",
                                 "--vit", "vit_tiny_patch16_224"])
    assert cfg.model.small_stem is None and cfg.model.vit_patch_size is None  # None = the rules
    m = cfg.model
    cass = CASS(m.cnn, m.vit, embed_dim=16, head="mlp", proj_hidden_dim=32, img_size=cfg.data.image_size,
                vit_patch_size=m.vit_patch_size, small_stem=m.small_stem)
    assert cass.cnn_spec.small_stem and cass.vit_spec.timm_kwargs["patch_size"] == 7
    z_cnn, z_vit = cass(torch.randn(4, 3, 28, 28))
    assert z_cnn.shape == z_vit.shape == (4, 16)
    off = parse_pretrain_config(["--data", "x", "--image-size", "28", "--model.small_stem", "false"])
    assert off.model.small_stem is False


def test_small_stem_export_records_it_and_reloads_in_cass_dist_and_plain_timm(tmp_path):
    torch.manual_seed(0)
    model = CASS("resnet18", "vit_tiny_patch16_224", embed_dim=8, head="mlp", proj_hidden_dim=16, img_size=28).eval()
    paths = export_backbones(model, tmp_path)
    info = json.loads(paths["model_json"].read_text())
    assert info["cnn"]["small_stem"] is True and info["vit"]["small_stem"] is False
    assert info["image_size"] == 28 and info["vit"]["timm_kwargs"]["patch_size"] == 7
    x = torch.randn(2, 3, 28, 28)
    f_cnn, f_vit = model.features(x)
    torch.testing.assert_close(load_backbone(tmp_path, "cnn").eval()(x), f_cnn)
    torch.testing.assert_close(load_backbone(tmp_path, "vit").eval()(x), f_vit)
    # The three lines of docs/downstream.md, in plain timm + safetensors:
    plain = timm.create_model("resnet18", **info["cnn"]["timm_kwargs"])
    plain.conv1, plain.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    plain.load_state_dict(load_file(str(paths["cnn"])))
    torch.testing.assert_close(plain.eval()(x), f_cnn)
    # An export written before the small stem has no such key: it means timm's stem.
    del info["cnn"]["small_stem"]
    paths["model_json"].write_text(json.dumps(info))
    assert read_export_info(tmp_path)["cnn"]["small_stem"] is False


def test_standard_weights_load_into_a_small_stem_all_but_the_stem_conv(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=5)  # e.g. ImageNet weights: a 7x7 stem conv
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    small = create_backbone("resnet18", num_classes=0, small_stem=True, pretrained_file=path)
    assert small.conv1.weight.shape == (64, 3, 3, 3)
    for key, value in small.state_dict().items():
        if key != "conv1.weight":
            torch.testing.assert_close(value, source.state_dict()[key], msg=key)
    broken = dict(source.state_dict())
    broken["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    save_file({k: v.contiguous() for k, v in broken.items()}, str(path))
    with pytest.raises(BackboneError, match="does not fit timm model 'resnet18' with a small stem"):
        create_backbone("resnet18", num_classes=0, small_stem=True, pretrained_file=path)

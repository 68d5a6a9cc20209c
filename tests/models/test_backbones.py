"""Backbones: creation by name, ViT overrides for small images, and where pretrained weights come from."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from cass_dist.models import BackboneError, WeightsUnavailableError, create_backbone


def test_vit_patch_and_image_size_overrides_give_real_token_counts():
    vit = create_backbone("test_vit", num_classes=10, img_size=32, patch_size=4)
    assert vit.patch_embed.num_patches == 64
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_and_foreign_keyword_are_named():
    with pytest.raises(BackboneError, match="no model named 'resnet_nonexistent'"):
        create_backbone("resnet_nonexistent")
    with pytest.raises(BackboneError, match="'test_resnet' rejected keywords"):
        create_backbone("test_resnet", img_size=32)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "resnet.safetensors"
    with pytest.raises(WeightsUnavailableError, match=f"{missing}.*does not exist"):
        create_backbone("test_resnet", pretrained_file=missing)


def test_offline_without_cached_weights_fails_fast_and_says_what_to_do(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="offline and not found in cache dir.*--pretrained-file"):
        create_backbone("test_resnet", pretrained=True, cache_dir=tmp_path, offline=True)


def test_pretrained_file_loads_its_weights_and_keeps_a_matching_classifier(tmp_path):
    source = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_backbone("test_resnet", num_classes=7, pretrained_file=path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    # Another class count: the trunk loads, the classifier is new (timm's rule for fine-tuning).
    other = create_backbone("test_resnet", num_classes=3, pretrained_file=path)
    trunk = [k for k in source.state_dict() if not k.startswith("fc.")]
    for key in trunk:
        torch.testing.assert_close(other.state_dict()[key], source.state_dict()[key])
    assert other.get_classifier().out_features == 3


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit").state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="does not fit timm model 'test_resnet'"):
        create_backbone("test_resnet", pretrained_file=path)


def test_hub_weights_already_in_a_cache_dir_are_used_offline(tmp_path):
    # The layout huggingface_hub writes: models--<org>--<name>/refs/main and snapshots/<rev>/<file>.
    hub_id = timm.get_pretrained_cfg("test_resnet").hf_hub_id
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    source = timm.create_model("test_resnet")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    loaded = create_backbone("test_resnet", pretrained=True, cache_dir=tmp_path, offline=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))

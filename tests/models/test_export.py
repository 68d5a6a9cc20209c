"""Exports: plain-timm loadable safetensors with identical outputs, and clear errors on bad exports."""

import json

import pytest
import timm
import torch

from cass_dist.models import (
    CASS,
    BackboneError,
    WeightsUnavailableError,
    export_backbones,
    load_backbone,
    read_export_info,
)


def _tiny(head="linear", embed_dim=24):
    torch.manual_seed(0)
    return CASS("test_resnet", "test_vit", embed_dim=embed_dim, head=head, img_size=32, vit_patch_size=4).eval()


def test_export_loads_in_plain_timm_with_identical_outputs(tmp_path):
    model = _tiny()
    paths = export_backbones(model, tmp_path, extra={"manifest_digest": "abc", "config": {"seed": 1}})
    assert paths["cnn"] == tmp_path / "export" / "cnn.safetensors"
    info = json.loads(paths["model_json"].read_text())
    assert info["extra"] == {"manifest_digest": "abc", "config": {"seed": 1}}
    assert info["embed_dim"] == 24
    x = torch.randn(3, 3, 32, 32)
    z_cnn, z_vit = model(x)
    for branch, z in (("cnn", z_cnn), ("vit", z_vit)):
        spec = info[branch]
        plain = timm.create_model(
            spec["name"], pretrained=True, **spec["timm_kwargs"],
            pretrained_cfg_overlay=dict(file=str(paths[branch]), num_classes=24),
        ).eval()
        torch.testing.assert_close(plain(x), z)
        ours = load_backbone(tmp_path, branch).eval()  # the run dir works as well as the export dir
        torch.testing.assert_close(ours(x), z)
    assert not [p for p in (tmp_path / "export").iterdir() if p.name.endswith(".tmp")]


def test_projector_export_is_a_feature_extractor_and_takes_a_new_classifier(tmp_path):
    model = _tiny(head="mlp", embed_dim=16)
    export_backbones(model, tmp_path / "export")
    x = torch.randn(2, 3, 32, 32)
    f_cnn, f_vit = model.features(x)
    torch.testing.assert_close(load_backbone(tmp_path / "export" / "vit.safetensors", "vit").eval()(x), f_vit)
    classifier = load_backbone(tmp_path, "cnn", num_classes=5).eval()
    assert classifier(x).shape == (2, 5)
    torch.testing.assert_close(classifier.forward_features(x), model.cnn.forward_features(x))


def test_missing_or_incomplete_export_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="model.json is missing"):
        load_backbone(tmp_path, "cnn")
    export_backbones(_tiny(), tmp_path)
    (tmp_path / "export" / "vit.safetensors").unlink()
    with pytest.raises(WeightsUnavailableError, match="vit.safetensors is missing"):
        load_backbone(tmp_path, "vit")


def test_architecture_mismatch_names_expected_and_found(tmp_path):
    export_backbones(_tiny(), tmp_path)
    with pytest.raises(BackboneError, match="expected timm model 'resnet50' but .* holds 'test_resnet'"):
        load_backbone(tmp_path, "cnn", expected_model="resnet50")
    info_path = tmp_path / "export" / "model.json"
    info = read_export_info(tmp_path)
    info["cnn"]["name"] = "test_vit"
    info_path.write_text(json.dumps(info))
    with pytest.raises(BackboneError, match="holds timm model 'test_resnet' but model.json says 'test_vit'"):
        load_backbone(tmp_path, "cnn")

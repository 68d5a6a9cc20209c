"""Exports: plain-timm loadable safetensors with identical outputs, and clear errors on bad exports."""

import json

import pytest
import timm
import torch

from cass_dist.models import (
    CASS,
    BackboneError,
    ExportError,
    WeightsUnavailableError,
    export_backbones,
    load_backbone,
    read_export_info,
)


def _tiny(head="linear", embed_dim=24, small_stem=None):
    torch.manual_seed(0)
    return CASS("test_resnet", "test_vit", embed_dim=embed_dim, head=head, img_size=32, vit_patch_size=4,
                small_stem=small_stem).eval()


def test_export_loads_in_plain_timm_with_identical_outputs(tmp_path):
    # timm's own stem: the export loads with one timm.create_model call (the small stem: test_small_images.py).
    model = _tiny(small_stem=False)
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


@pytest.mark.parametrize("keyword, value", [("checkpoint_path", "/etc/passwd"),
                                            ("pretrained_cfg_overlay", {"file": "/tmp/x.pth"}),
                                            ("act_layer", "gelu")])
def test_keywords_outside_the_allow_list_never_reach_timm(tmp_path, keyword, value, monkeypatch):
    export_backbones(_tiny(), tmp_path)
    info_path = tmp_path / "export" / "model.json"
    info = json.loads(info_path.read_text())
    info["cnn"]["timm_kwargs"][keyword] = value
    info_path.write_text(json.dumps(info))
    reached = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: reached.append(k))
    with pytest.raises(ExportError, match=rf"model.json: cnn.timm_kwargs: keywords \['{keyword}'\] are not accepted"):
        load_backbone(tmp_path, "cnn")
    assert reached == []


def test_a_keyword_value_that_is_not_plain_data_is_refused(tmp_path):
    export_backbones(_tiny(), tmp_path)
    info_path = tmp_path / "export" / "model.json"
    info = json.loads(info_path.read_text())
    info["vit"]["timm_kwargs"]["img_size"] = {"file": "x"}
    info_path.write_text(json.dumps(info))
    with pytest.raises(ExportError, match="vit.timm_kwargs.img_size: expected a number"):
        read_export_info(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text("{not json"), "not valid JSON"),
    (lambda p: p.write_text("[1, 2]"), "expected a JSON object, got list"),
    (lambda p: p.write_text(json.dumps({"format_version": 1, "cnn": "resnet18"})), "cnn: expected an object"),
    (lambda p: p.write_text(json.dumps({"format_version": 1})), "holds no branch"),
    (lambda p: p.write_text(json.dumps({"format_version": 7, "cnn": {}})), "format_version 7"),
])
def test_a_damaged_model_json_is_one_clear_error_naming_the_file(tmp_path, damage, message):
    export_backbones(_tiny(), tmp_path)
    damage(tmp_path / "export" / "model.json")
    with pytest.raises(ExportError, match=message) as err:
        load_backbone(tmp_path, "cnn")
    assert "model.json" in str(err.value)


def test_truncated_weights_are_one_clear_error_naming_the_file(tmp_path):
    paths = export_backbones(_tiny(), tmp_path)
    data = paths["vit"].read_bytes()
    paths["vit"].write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="vit.safetensors: not a readable safetensors file"):
        load_backbone(tmp_path, "vit")
    paths["cnn"].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")  # a header that is not a tensor table
    with pytest.raises((ExportError, BackboneError), match="cnn.safetensors"):
        load_backbone(tmp_path, "cnn")


def test_an_export_holding_one_branch_loads_it_and_names_the_missing_one(tmp_path):
    model = _tiny()
    paths = export_backbones(model, tmp_path)
    info = json.loads(paths["model_json"].read_text())
    del info["vit"]
    paths["model_json"].write_text(json.dumps(info))
    paths["vit"].unlink()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_backbone(tmp_path, "cnn").eval()(x), model(x)[0])
    with pytest.raises(ExportError, match=r"holds no 'vit' branch \(it holds \['cnn'\], method cass\)"):
        load_backbone(tmp_path, "vit")


def test_a_vit_export_is_rebuilt_for_another_image_size_with_resampled_position_embeddings(tmp_path):
    model = _tiny()  # test_vit at 32 px, patch 4: an 8x8 grid
    export_backbones(model, tmp_path)
    same = load_backbone(tmp_path, "vit", img_size=32)
    torch.testing.assert_close(same.pos_embed, model.vit.pos_embed)
    bigger = load_backbone(tmp_path, "vit", img_size=48)  # a 12x12 grid
    assert bigger.patch_embed.num_patches == 144
    assert bigger(torch.randn(2, 3, 48, 48)).shape == (2, 24)
    torch.testing.assert_close(bigger.patch_embed.proj.weight, model.vit.patch_embed.proj.weight)
    with pytest.raises(BackboneError, match="smaller than the exported ViT's patch size 4"):
        load_backbone(tmp_path, "vit", img_size=3)

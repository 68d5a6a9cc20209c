"""The launch scripts on every kind of --init: image sizes that follow the data and the export, and one
clear line with a non-zero exit for a damaged or refused export, before any run dir is written."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import yaml

from cass_dist.configs.base import ConfigError
from cass_dist.configs.finetune import parse_evaluate_config
from cass_dist.data import load_manifest
from cass_dist.engine.inits import read_init, resolve_image_size
from tests.downstream.test_end_to_end import launcher

finetune, evaluate = launcher("finetune"), launcher("evaluate")


def common(shards, out, *extra):
    return ["--data", str(shards), "--precision", "fp32", "--output-dir", str(out), *extra]


def error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error: "), err[-2000:]
    return line


def test_a_random_vit_is_built_for_the_data_s_image_size(shards28, tmp_path):
    # timm's vit_tiny_patch16_224 alone fails on 28 px ("Input height (28) doesn't match model (224)").
    assert evaluate(common(shards28, tmp_path / "knn", "--init", "random", "--branch", "vit")) == 0
    assert finetune(common(shards28, tmp_path / "ft", "--init", "random", "--branch", "vit", "--max-steps", "1",
                           "--batch-size", "16")) == 0
    info = json.loads((tmp_path / "ft/best/classifier.json").read_text())
    assert info["image_size"] == 28
    assert info["branches"]["vit"]["timm_kwargs"] == {"num_classes": 0, "img_size": 28, "patch_size": 7}
    assert evaluate(common(shards28, tmp_path / "head", "--init", str(tmp_path / "ft"), "--probe", "head")) == 0
    head = json.loads((tmp_path / "head/metrics.json").read_text())
    tuned = json.loads((tmp_path / "ft/metrics.json").read_text())
    assert head["test"]["confusion_matrix"] == tuned["test"]["confusion_matrix"]


def test_an_export_is_used_at_its_own_size_unless_asked_and_then_resized(shards28, tiny_export, tmp_path, capsys,
                                                                        caplog):
    # tiny_export was trained at 32 px; the shards are 28 px.
    caplog.set_level(logging.INFO, logger="cass_dist")
    assert evaluate(common(shards28, tmp_path / "own", "--init", str(tiny_export), "--branch", "vit")) == 0
    assert yaml.safe_load((tmp_path / "own/config.yaml").read_text())["data"]["image_size"] == 32
    assert "image size 32 px, the size" in caplog.text
    assert evaluate(common(shards28, tmp_path / "at28", "--init", str(tiny_export), "--branch", "both",
                           "--image-size", "28")) == 0
    assert "position embeddings resampled" in caplog.text
    assert finetune(common(shards28, tmp_path / "ft28", "--init", str(tiny_export), "--branch", "vit",
                           "--image-size", "28", "--max-steps", "1", "--batch-size", "16")) == 0
    info = json.loads((tmp_path / "ft28/best/classifier.json").read_text())
    assert info["image_size"] == 28 and info["branches"]["vit"]["timm_kwargs"]["img_size"] == 28
    # A fine-tuned ViT is evaluated at its own size: another one is refused, in one line.
    capsys.readouterr()
    assert evaluate(common(shards28, tmp_path / "no", "--init", str(tmp_path / "ft28"), "--probe", "head",
                           "--image-size", "32")) == 1
    assert "trained at 28 px and is evaluated at that size only" in error_line(capsys, "launch/evaluate.py")


def test_no_image_size_for_mixed_sizes_names_the_field(shards28, tiny_export, tmp_path):
    manifest = load_manifest(shards28)
    cfg = parse_evaluate_config(["--data", str(shards28)])
    assert resolve_image_size(cfg.data, manifest, read_init("random"), ("cnn",))[0] == 28
    manifest.image.size = None
    with pytest.raises(ConfigError, match="data.image_size: the images .* not one square size; pass --image-size"):
        resolve_image_size(cfg.data, manifest, read_init("random"), ("cnn",))
    assert resolve_image_size(cfg.data, manifest, read_init(str(tiny_export)), ("cnn",))[0] == 32


def _damaged_export(tiny_export, tmp_path, damage):
    run = tmp_path / "damaged_run"
    shutil.copytree(tiny_export, run)
    damage(run / "export")
    return run


@pytest.mark.parametrize("damage, names", [
    (lambda d: (d / "cnn.safetensors").write_bytes((d / "cnn.safetensors").read_bytes()[:5000]), "cnn.safetensors"),
    (lambda d: (d / "model.json").write_text("[]"), "model.json"),
    (lambda d: (d / "model.json").write_text((d / "model.json").read_text()[:40]), "model.json"),
    (lambda d: (d / "model.json").write_text((d / "model.json").read_text().replace(
        '"num_classes": 16', '"num_classes": 16, "checkpoint_path": "/etc/passwd"')), "checkpoint_path"),
], ids=["truncated-weights", "json-not-an-object", "truncated-json", "refused-timm-keyword"])
@pytest.mark.parametrize("script", ["finetune", "evaluate"])
def test_a_damaged_or_refused_export_is_one_line_and_exit_1_before_any_run_dir(shards28, tiny_export, tmp_path,
                                                                               capsys, damage, names, script):
    run = _damaged_export(tiny_export, tmp_path, damage)
    out = tmp_path / "out"
    main = finetune if script == "finetune" else evaluate
    assert main(common(shards28, out, "--init", str(run), "--branch", "cnn")) == 1
    line = error_line(capsys, f"launch/{script}.py")
    assert names in line and str(run) in line
    assert not out.exists()  # refused up front: nothing half-made to clean or resume


def test_a_damaged_fine_tuned_classifier_is_one_line(shards28, tmp_path, capsys):
    assert finetune(common(shards28, tmp_path / "ft", "--init", "random", "--max-steps", "1", "--batch-size", "16")) == 0
    capsys.readouterr()
    assert finetune(common(shards28, tmp_path / "again", "--init", str(tmp_path / "ft"))) == 1
    assert "a fine-tuned classifier, not a pretraining run" in error_line(capsys, "launch/finetune.py")
    info_path = tmp_path / "ft/best/classifier.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "branches": "resnet18"}))
    capsys.readouterr()
    assert evaluate(common(shards28, tmp_path / "head", "--init", str(tmp_path / "ft"), "--probe", "head")) == 1
    assert "classifier.json" in error_line(capsys, "launch/evaluate.py")


@pytest.mark.parametrize("script", ["finetune", "evaluate"])
def test_downstream_image_size_is_validated_like_pretraining(shards28, tmp_path, capsys, script):
    main = finetune if script == "finetune" else evaluate
    assert main(common(shards28, tmp_path / "x", "--image-size", "7")) == 2
    assert "data.image_size: must be >= 8" in error_line(capsys, f"launch/{script}.py")


def test_evaluate_refuses_resume_where_it_means_nothing(shards28, tmp_path, capsys):
    assert evaluate(common(shards28, tmp_path / "x", "--resume", "auto")) == 2
    assert "run.resume: launch/evaluate.py has no checkpoints to resume" in error_line(capsys, "launch/evaluate.py")


def test_small_stem_is_the_cnn_s_and_leaves_the_vit_alone(shards28, tmp_path):
    # model.small_stem names the CNN's stem; with --branch both the ViT must still build
    assert finetune(common(shards28, tmp_path / "ft", "--init", "random", "--branch", "both", "--max-steps", "1",
                           "--batch-size", "16", "--model.small_stem", "true")) == 0
    branches = json.loads((tmp_path / "ft/best/classifier.json").read_text())["branches"]
    assert branches["cnn"]["small_stem"] is True
    assert branches["vit"]["small_stem"] is False

"""Fine-tuning: label-fraction plumbing, early stopping, the saved classifier, and bad inputs."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from cass_dist.configs.base import ConfigError
from cass_dist.configs.finetune import parse_evaluate_config, parse_finetune_config
from cass_dist.data import load_manifest
from cass_dist.data.sharding import read_split_index
from cass_dist.data.splits import select_label_fraction
from cass_dist.engine.classifier import build_backbone, load_classifier
from cass_dist.engine.finetune import build_train_loader, finetune
from cass_dist.models import BackboneError, WeightsUnavailableError
from tests._steps import overflow_at_call


def finetune_args(shards, out, *extra: str) -> list[str]:
    return ["--data", str(shards), "--init", "random", "--branch", "cnn", "--batch-size", "16",
            "--image-size", "32", "--precision", "fp32", "--log-every", "1", "--output-dir", str(out), *extra]


def test_label_fraction_reaches_the_loader(syn_shards):
    cfg = parse_finetune_config(finetune_args(syn_shards, "unused", "--label-fraction", "0.25",
                                              "--data.fraction_seed", "3", "--batch-size", "1"))
    single = SimpleNamespace(process_index=0, num_processes=1, device="cpu")
    keys = [k for batch in build_train_loader(cfg, single, 0, 0) for k in batch["key"]]
    manifest = load_manifest(syn_shards)
    index = read_split_index(syn_shards, manifest, "train")
    expected = select_label_fraction([index.labels[k] for k in index.keys], 0.25, seed=3, task=manifest.task)
    assert sorted(keys) == sorted(index.keys[i] for i in expected)
    assert len(keys) == pytest.approx(0.25 * manifest.split("train").count, abs=manifest.num_classes)


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.1"])
def test_label_fraction_out_of_range_is_refused(syn_shards, fraction):
    with pytest.raises(ConfigError, match="data.label_fraction"):
        parse_finetune_config(finetune_args(syn_shards, "unused", "--label-fraction", fraction))
    with pytest.raises(ConfigError, match="data.label_fraction"):
        parse_evaluate_config(["--data", str(syn_shards), "--label-fraction", fraction])


def test_early_stopping_stops_after_patience_and_keeps_best(syn_shards, binary_shards, tmp_path):
    # lr so small that val F1 cannot rise by min_delta: evaluation 2 is not an improvement -> stop.
    args = ["--max-steps", "6", "--eval-every", "1", "--patience", "1", "--early_stop.min_delta", "0.5",
            "--lr", "0.000000001", "--label-fraction", "0.5"]
    stopped = finetune(parse_finetune_config(finetune_args(syn_shards, tmp_path / "stop", *args)))
    assert stopped["early_stopped"] and stopped["steps"] == 2 and stopped["best_step"] == 1
    assert stopped["label_fraction"] == 0.5
    evals = [json.loads(line) for line in (tmp_path / "stop/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "val_f1_macro" in r] == [1, 2]
    on_disk = json.loads((tmp_path / "stop/metrics.json").read_text())
    assert on_disk["test"]["f1_macro"] == pytest.approx(stopped["test"]["f1_macro"])
    assert (tmp_path / "stop/curves.png").stat().st_size > 0
    assert (tmp_path / "stop/confusion_matrix.png").stat().st_size > 0

    args[args.index("--patience") + 1] = "0"  # patience 0: never stop early
    full = finetune(parse_finetune_config(finetune_args(syn_shards, tmp_path / "full", *args)))
    assert not full["early_stopped"] and full["steps"] == 6

    # The saved best classifier refuses a dataset with other classes, and another architecture.
    manifest = load_manifest(syn_shards)
    assert load_classifier(tmp_path / "stop", manifest).num_classes == 3
    with pytest.raises(ValueError, match="classes"):
        load_classifier(tmp_path / "stop", load_manifest(binary_shards))
    info_path = tmp_path / "stop/best/classifier.json"
    info = json.loads(info_path.read_text())
    info["branches"]["cnn"]["name"] = "resnet34"
    info_path.write_text(json.dumps(info))
    with pytest.raises(BackboneError, match="does not fit"):
        load_classifier(tmp_path / "stop", manifest)


def test_min_steps_lengthens_short_epochs_and_keeps_one_validation_per_epoch(syn_shards, tmp_path):
    # The defaults: 50 epochs but at least 500 steps, and the quick CPU preset without the floor.
    defaults = parse_finetune_config(["--data", str(syn_shards)]).run
    assert (defaults.epochs, defaults.min_steps, defaults.max_steps) == (50, 500, 0)
    assert parse_finetune_config(["--preset", "small", "--data", str(syn_shards)]).run.min_steps == 0
    # The same rule at a floor of 12 (500 steps would take minutes here): 10% of 168 images at batch 8 is
    # 2 steps an epoch, so 3 epochs would be 6 steps; the floor makes 12, validated every 12 / 3 = 4.
    args = ["--label-fraction", "0.1", "--batch-size", "8", "--epochs", "3", "--min-steps", "12", "--lr", "0.001"]
    floored = finetune(parse_finetune_config(finetune_args(syn_shards, tmp_path / "floored", *args)))
    assert floored["steps"] == 12 and not floored["early_stopped"]
    records = [json.loads(line) for line in (tmp_path / "floored/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_f1_macro" in r] == [4, 8, 12]
    assert max(r["epoch"] for r in records if "epoch" in r) >= 5  # it did pass over the subset more than 3 times

    args[args.index("--min-steps") + 1] = "4"  # a floor below 3 epochs' 6 steps: epochs as asked, one eval each
    plain = finetune(parse_finetune_config(finetune_args(syn_shards, tmp_path / "plain", *args)))
    records = [json.loads(line) for line in (tmp_path / "plain/metrics.jsonl").read_text().splitlines()]
    assert plain["steps"] == 6 and [r["step"] for r in records if "val_f1_macro" in r] == [2, 4, 6]


def test_bad_init_paths(tiny_export, tmp_path):
    cfg = parse_finetune_config(["--data", "x", "--init", str(tiny_export), "--branch", "vit"]).model
    backbone, spec = build_backbone(cfg, "vit")
    assert spec["name"] == "vit_tiny_patch16_224" and spec["timm_kwargs"]["num_classes"] == 0
    assert backbone.num_classes == 0

    no_export = tmp_path / "run_without_export"
    (no_export / "checkpoints").mkdir(parents=True)
    cfg.init = str(no_export)
    with pytest.raises(WeightsUnavailableError, match="no export"):
        build_backbone(cfg, "cnn")

    cfg.init = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no such run dir"):
        build_backbone(cfg, "cnn")

    # A checkpoint of another architecture: the CNN's weights where the ViT's should be.
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_export, swapped)
    shutil.copy(swapped / "export/cnn.safetensors", swapped / "export/vit.safetensors")
    cfg.init = str(swapped)
    with pytest.raises(BackboneError, match="resnet18"):
        build_backbone(cfg, "vit")


def test_layer_decay_scales_lr_by_depth_and_heads_keep_full_lr(syn_shards):
    from cass_dist.engine.classifier import build_classifier
    from cass_dist.engine.finetune import build_optimizer

    cfg = parse_finetune_config(finetune_args(syn_shards, "unused", "--layer-decay", "0.5", "--lr", "0.01"))
    model = build_classifier(cfg.model, load_manifest(syn_shards))
    optimizer, base_lrs = build_optimizer(cfg, model)
    lr_of = {id(p): lr for group, lr in zip(optimizer.param_groups, base_lrs) for p in group["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter is optimised exactly once
    assert lr_of[id(model.heads["cnn"][1].weight)] == pytest.approx(0.01)
    # As configured (timm's grouping): the last block keeps lr, each earlier block gets another x0.5.
    cnn = model.backbones["cnn"]
    stem, before_last, last = cnn.conv1.weight, cnn.layer4[0].conv2.weight, cnn.layer4[-1].conv2.weight
    assert lr_of[id(last)] == pytest.approx(0.01)
    assert lr_of[id(before_last)] == pytest.approx(0.005)
    assert lr_of[id(stem)] < 0.01 * 0.5 ** 5
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.heads["cnn"][1].bias) in no_decay and id(stem) not in no_decay


def test_frozen_backbone_steps_train_only_the_head_then_everything(syn_shards, tiny_export, tmp_path):
    from cass_dist.engine.finetune import lr_factors
    from cass_dist.models import load_backbone

    args = finetune_args(syn_shards, tmp_path / "lpft", "--init", str(tiny_export), "--max-steps", "3",
                         "--eval-every", "3", "--patience", "0", "--lr", "0.01", "--warmup-steps", "2",
                         "--freeze-backbone-steps", "3")
    cfg = parse_finetune_config(args)
    # 10 steps, warmup 2: the head warms up at once; the backbone waits 3 steps, then warms up over 2
    # and follows a cosine over its remaining 5 (0.5 * (1 + cos(pi / 5)) = 0.9045 after one of them).
    factors = [lr_factors(cfg, step, 10) for step in range(7)]
    assert [f["backbone"] for f in factors] == [0, 0, 0, 0.5, 1.0, 1.0, pytest.approx(0.9045, abs=1e-4)]
    assert [f["head"] for f in factors[:4]] == [0.5, 1.0, 1.0, pytest.approx(0.9619, abs=1e-4)]
    unfrozen = parse_finetune_config(args[:-2])
    assert all(lr_factors(unfrozen, s, 10)["backbone"] == lr_factors(unfrozen, s, 10)["head"] for s in range(10))

    finetune(cfg)  # three steps, all frozen: the weights stay the export's, the head learns
    tuned = load_classifier(tmp_path / "lpft")
    exported = dict(load_backbone(tiny_export, "cnn", num_classes=0).named_parameters())
    assert all(torch.equal(p, exported[name]) for name, p in tuned.backbones["cnn"].named_parameters())

    cfg.optim.freeze_backbone_steps, cfg.run.output_dir = 1, str(tmp_path / "lpft_then_all")
    finetune(cfg)
    tuned = load_classifier(tmp_path / "lpft_then_all")
    assert not all(torch.equal(p, exported[name]) for name, p in tuned.backbones["cnn"].named_parameters())
    with pytest.raises(ConfigError, match="optim.freeze_backbone_steps"):
        parse_finetune_config(finetune_args(syn_shards, "unused", "--freeze-backbone-steps", "-1"))


def test_loss_scaler_skips_are_counted_and_kept_in_the_train_state(syn_shards, tmp_path, monkeypatch):
    # CPU has no GradScaler: the step reports the scaler's skip here (the real GradScaler case is
    # tests/distributed/test_nonfinite_guard.py); what this checks is the fine-tuning loop's count.
    from cass_dist.engine import finetune as finetune_module
    from cass_dist.engine.checkpoint import find_latest, read_train_state

    monkeypatch.setattr(finetune_module, "optimizer_step", overflow_at_call(finetune_module.optimizer_step, 2))
    finetune(parse_finetune_config(finetune_args(syn_shards, tmp_path, "--max-steps", "3")))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["overflow_steps"] for r in logged if "train_loss" in r] == [0, 1, 1]
    assert all(r["nonfinite_steps"] == 0 for r in logged if "train_loss" in r)
    assert read_train_state(find_latest(tmp_path / "checkpoints")).overflow_steps == 1

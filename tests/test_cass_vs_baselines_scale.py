"""The study's scales: every contender of a scale gets its models, image size, stem and precision, in
pretraining and fine-tuning alike (a pretrained CNN and the supervised one never differ in architecture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cass_dist.configs.finetune import parse_finetune_config
from cass_dist.configs.pretrain import parse_pretrain_config


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("cass_vs_baselines")


def configs(study, tmp_path: Path, argv: list[str], dataset: str, contender: str):
    s = study.Study(study.parse_args([*argv, "--work", str(tmp_path)]), dataset)
    pre = parse_pretrain_config(s.pretrain_argv(contender, 600, 0, tmp_path / "pre"))
    fine = parse_finetune_config(s.finetune_argv("random", "vit", 0.1, 142, 0, 1e-3, tmp_path / "ft"))
    return s, pre, fine


@pytest.mark.parametrize("contender", ["cass", "dino-vit"])
def test_paper_scale_gives_every_run_resnet50_vit_base_at_224_with_timm_stem_and_bf16_where_available(
        study, tmp_path, contender):
    s, pre, fine = configs(study, tmp_path, ["--scale", "paper"], "brain_mri", contender)
    assert s.opts.datasets == ["brain_mri"] and s.source[s.source.index("--resize") + 1] == "224"
    assert (pre.model.cnn, pre.model.vit, pre.data.image_size) == ("resnet50", "vit_base_patch16_224", 224)
    assert pre.model.vit_patch_size == 16 and pre.model.small_stem is False and pre.model.channels_last is True
    assert pre.run.precision == "auto" and pre.model.pretrained is False  # ImageNet-free
    assert pre.method == ("dino" if contender == "dino-vit" else "cass")
    assert (fine.model.cnn, fine.model.vit, fine.data.image_size) == ("resnet50", "vit_base_patch16_224", 224)
    assert fine.model.vit_kwargs == {"img_size": 224, "patch_size": 16} and fine.model.small_stem is False
    assert fine.run.precision == "auto"
    section = s.model_section("random")  # the probes' random-init backbones
    assert (section.cnn, section.vit, section.small_stem) == ("resnet50", "vit_base_patch16_224", False)
    assert Path(s.work).name == "brain_mri" and "cass_vs_baselines" not in str(s.work)  # --work as given


def test_small_scale_is_the_cpu_study_resnet18_vit_tiny_16_tokens_fp32(study, tmp_path):
    s, pre, fine = configs(study, tmp_path, [], "breastmnist", "cass")
    assert s.opts.datasets == ["pneumoniamnist", "breastmnist", "brain_mri"]
    assert (pre.model.cnn, pre.model.vit, pre.data.image_size, pre.model.vit_patch_size) == (
        "resnet18", "vit_tiny_patch16_224", 28, 7)
    assert pre.model.small_stem is True and pre.run.precision == "fp32" and fine.run.precision == "fp32"
    assert fine.model.cnn == "resnet18" and fine.model.vit_kwargs == {"img_size": 28, "patch_size": 7}
    mri = study.Study(study.parse_args(["--work", str(tmp_path)]), "brain_mri")
    assert (mri.args.image_size, mri.args.patch) == (64, 16)


def test_paper_scale_refuses_the_28px_sets_and_names_the_flag(study, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--scale", "paper", "--datasets", "breastmnist"])
    assert "--datasets: --scale paper runs on brain_mri" in capsys.readouterr().err


def test_default_work_dirs_keep_the_scales_apart(study):
    assert study.parse_args([]).work == "runs/benchmarks/cass_vs_baselines"
    assert study.parse_args(["--scale", "paper"]).work == "runs/benchmarks/cass_vs_baselines-paper"
    assert study.parse_args(["--scale", "paper", "--quick"]).work == "runs/benchmarks/cass_vs_baselines-paper-quick"
    assert study.parse_args(["--quick"]).datasets == ["breastmnist"]


def test_each_scale_has_its_default_stem_and_an_explicit_stem_wins(study):
    assert study.parse_args([]).stem == "small" and study.parse_args(["--scale", "paper"]).stem == "timm"
    assert study.parse_args(["--scale", "paper", "--stem", "small"]).stem == "small"
    assert study.parse_args(["--stem", "timm"]).stem == "timm"


def test_each_seed_fine_tunes_on_its_own_draw_of_the_labels(study, tmp_path):
    """The seeds' spread must include which few labels were drawn (47 images at 1% of PneumoniaMNIST);
    within a seed every contender still fine-tunes on the same subset, so paired differences stay paired."""
    s = study.Study(study.parse_args(["--work", str(tmp_path)]), "breastmnist")
    drawn = [(seed, parse_finetune_config(s.finetune_argv(init, "cnn", 0.01, 5, seed, 1e-3, tmp_path / "ft")).data)
             for seed in (0, 2) for init in ("random", "runs/x")]  # supervised and pretrained alike
    assert [(seed, d.fraction_seed, d.label_fraction) for seed, d in drawn] == [
        (0, 0, 0.01), (0, 0, 0.01), (2, 2, 0.01), (2, 2, 0.01)]

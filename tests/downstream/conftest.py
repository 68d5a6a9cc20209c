"""Fixtures of the downstream tests: one small synthetic shard set and one tiny CASS export per session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


@pytest.fixture(scope="session")
def syn_shards(tmp_path_factory) -> Path:
    """A 3-class synthetic shard set of 240 images at 32 px (train 168 / val 24 / test 48)."""
    from cass_dist.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("downstream") / "syn"
    build_synthetic(out, num_images=240, image_size=32, num_classes=3, seed=0)
    return out


@pytest.fixture(scope="session")
def binary_shards(tmp_path_factory) -> Path:
    """A binary synthetic shard set (other classes than ``syn_shards``)."""
    from cass_dist.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("downstream") / "syn_binary"
    build_synthetic(out, num_images=80, image_size=32, num_classes=2, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A pretraining-like run dir holding only ``export/`` of an untrained tiny CASS pair."""
    from cass_dist.models import CASS, export_backbones

    run_dir = tmp_path_factory.mktemp("downstream") / "pretrain_run"
    model = CASS("resnet18", "vit_tiny_patch16_224", embed_dim=16, img_size=32, vit_patch_size=8)
    export_backbones(model, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def shards28(tmp_path_factory) -> Path:
    """A 3-class synthetic shard set at 28 px, MedMNIST's size (120 images: train 84 / val 12 / test 24)."""
    from cass_dist.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("downstream") / "syn28"
    build_synthetic(out, num_images=120, image_size=28, num_classes=3, seed=2)
    return out

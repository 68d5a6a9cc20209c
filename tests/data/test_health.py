"""Corrupt data is loud: per-shard counts, a warning at the first skip, a limit per epoch, sha256 before training."""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.data import build_loader, load_manifest
from cass_dist.data.health import CorruptDataError, ShardDigestError, SkipTracker, check_digests
from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine.pretrain import pretrain
from tests._accelerate import reset_accelerate_state

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test trains in-process


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """224 train samples in 3 shards (80, 80, 64)."""
    out = tmp_path_factory.mktemp("health") / "shards"
    build_synthetic(out, num_images=320, image_size=32, shard_size=80, num_workers=0)
    return out


def truncated(shards: Path, tmp_path: Path, keep_samples: int = 40) -> Path:
    """A copy whose train-000001.tar is cut inside sample ``keep_samples``: the rest of that shard is lost."""
    out = tmp_path / "damaged"
    shutil.copytree(shards, out)
    path = out / "train-000001.tar"
    with tarfile.open(path) as tar:
        cut_at = [m for m in tar.getmembers() if m.name.endswith(".png")][keep_samples].offset_data + 10
    path.write_bytes(path.read_bytes()[:cut_at])
    return out


def test_skips_are_counted_per_shard_and_warned_at_the_first_one(shards, tmp_path, caplog):
    damaged = truncated(shards, tmp_path)
    with caplog.at_level(logging.WARNING, logger="cass_dist"):
        loader = build_loader(damaged, "train", batch_size=16, train=False, num_workers=2)
        keys = [k for batch in loader for k in batch["key"]]
    assert loader.skipped_by_shard() == {"train-000001.tar": 40} and len(keys) == 224 - 40
    warnings = [r.getMessage() for r in caplog.records if "corrupted samples skipped" in r.getMessage()]
    assert len(warnings) == 1 and "train-000001.tar (40)" in warnings[0] and "cass-shards verify" in warnings[0]


def test_the_tracker_stops_an_epoch_that_skips_more_than_allowed(shards, tmp_path):
    damaged = truncated(shards, tmp_path)
    loader = build_loader(damaged, "train", batch_size=16, train=True, seed=1)
    for _ in loader:  # one epoch: the truncated shard costs 40 of its samples
        pass
    messages = []
    lenient = SkipTracker(load_manifest(damaged), damaged, "train", max_fraction=0.5, print_fn=messages.append)
    assert lenient.check(loader, epoch=0) == loader.skipped() >= 40
    assert "train-000001.tar" in messages[0] and "train-000001.tar" in lenient.describe()
    strict = SkipTracker(load_manifest(damaged), damaged, "train", max_fraction=0.01, print_fn=messages.append)
    with pytest.raises(CorruptDataError, match=r"max_skipped_fraction.*train-000001.tar.*cass-shards verify"):
        strict.check(loader, epoch=0)
    assert strict.check(build_loader(shards, "train", batch_size=16, train=True), epoch=0) == 0  # intact: fine


class TwoRanks:
    """Stand-in for a 2-process Accelerator: rank ``rank``; the other rank's counts are ``other``."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, rank: int, other: list[int]):
        self.process_index, self.other = rank, other

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + torch.tensor(self.other)


def test_digests_are_checked_with_the_work_shared_between_ranks(shards, tmp_path):
    assert check_digests(shards, ["train", "val"]) == 3 + 1
    damaged = tmp_path / "flipped"
    shutil.copytree(shards, damaged)
    raw = bytearray((damaged / "train-000002.tar").read_bytes())
    raw[5000] ^= 0xFF
    (damaged / "train-000002.tar").write_bytes(bytes(raw))
    with pytest.raises(ShardDigestError, match=r"train-000002.tar.*cass-shards verify"):
        check_digests(damaged, ["train"])
    # Rank 0 hashes shards 0 and 2 (it finds the damage); rank 1 hashes shard 1 and learns of it by the sum.
    with pytest.raises(ShardDigestError, match="train-000002.tar"):
        check_digests(damaged, ["train"], accelerator=TwoRanks(1, other=[0, 0, 1]))
    assert check_digests(damaged, ["val"], accelerator=TwoRanks(0, other=[0])) == 1


def tiny(shards, out, *extra):
    return parse_pretrain_config([
        "--data", str(shards), "--output-dir", str(out), "--cnn", "test_resnet", "--vit", "test_vit",
        "--model.vit_patch_size", "8", "--embed-dim", "16", "--image-size", "32", "--batch-size", "16",
        "--precision", "fp32", "--model.channels_last", "false", "--log-every", "2", "--max-steps", "4", *extra])


def test_a_run_on_a_truncated_shard_stops_with_a_clear_error(shards, tmp_path):
    damaged = truncated(shards, tmp_path)
    with pytest.raises(CorruptDataError, match=r"train-000001.tar \(\d+\).*cass-shards verify"):
        pretrain(tiny(damaged, tmp_path / "strict"))  # the default data.max_skipped_fraction, 0.01
    reset_accelerate_state()
    summary = pretrain(tiny(damaged, tmp_path / "lenient", "--data.max_skipped_fraction", "0.5"))
    assert summary.steps == 4 and summary.skipped_samples >= 40


def test_verify_shards_refuses_a_damaged_set_before_training(shards, tmp_path):
    damaged = tmp_path / "flipped"
    shutil.copytree(shards, damaged)
    raw = bytearray((damaged / "train-000000.tar").read_bytes())
    raw[700] ^= 0xFF
    (damaged / "train-000000.tar").write_bytes(bytes(raw))
    with pytest.raises(ShardDigestError, match="train-000000.tar"):
        pretrain(tiny(damaged, tmp_path / "run", "--data.verify_shards"))
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))

"""build_loader: exact evaluation, equal training steps, resume, label fractions, corruption, errors."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cass_dist.data import ManifestError, build_loader, load_manifest
from cass_dist.data import reader as reader_module
from cass_dist.data.sources import Sample, SourceData
from cass_dist.data.splits import select_label_fraction
from cass_dist.data.synthetic import build_synthetic
from cass_dist.data.writer import WriteOptions, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """168 train samples in 9 shards of 20, 48 test samples in 3 shards: fewer shards than slots is easy."""
    out = tmp_path_factory.mktemp("stream") / "shards"
    build_synthetic(out, num_images=240, image_size=16, num_classes=3, shard_size=20, num_workers=0)
    return out


def index_keys(shard_dir: Path, split: str) -> list[str]:
    return json.loads((shard_dir / f"index-{split}.json").read_text())["keys"]


def epoch_keys(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar, passing each (name, bytes) through ``edit``; None drops the member."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = edit(member.name, data)
            if data is not None:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("split", ["train", "test"])
def test_eval_yields_every_sample_exactly_once(shards, split, world_size, num_workers):
    expected = index_keys(shards, split)
    labels = dict(zip(expected, json.loads((shards / f"index-{split}.json").read_text())["labels"]))
    seen: list[str] = []
    for rank in range(world_size):
        loader = build_loader(shards, split, batch_size=7, train=False, rank=rank, world_size=world_size,
                              num_workers=num_workers)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(b["key"]) == 7 for b in batches[:-1])
        for batch in batches:
            assert batch["label"].tolist() == [labels[k] for k in batch["key"]]
            seen.extend(batch["key"])
        assert loader.num_samples == len(expected) and loader.skipped() == 0
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("split,world_size", [("train", 3), ("test", 2)])
def test_training_ranks_run_equal_full_batches_over_disjoint_samples(shards, split, world_size, num_workers):
    total = len(index_keys(shards, split))
    batch_size = 5
    steps = total // (batch_size * world_size)
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(shards, split, batch_size=batch_size, train=True, rank=rank,
                              world_size=world_size, num_workers=num_workers, seed=3)
        keys = epoch_keys(loader)
        assert len(loader) == len(keys) == steps
        assert all(len(k) == batch_size for k in keys)
        assert loader.num_samples == steps * batch_size * world_size
        per_rank.append([k for batch in keys for k in batch])
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == steps * batch_size * world_size
    assert set(flat) <= set(index_keys(shards, split))


def test_training_order_is_a_function_of_seed_and_epoch(shards):
    def keys(seed, epoch):
        return epoch_keys(build_loader(shards, "train", batch_size=8, train=True, seed=seed, epoch=epoch,
                                       shuffle_buffer=16))
    first = keys(0, 0)
    assert keys(0, 0) == first
    assert keys(0, 1) != first and keys(1, 0) != first


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_batch_k_continues_the_same_stream(shards, num_workers):
    def loader(start):
        return build_loader(shards, "train", batch_size=6, train=True, rank=1, world_size=2,
                            num_workers=num_workers, seed=5, epoch=2, start_batch=start)
    full = epoch_keys(loader(0))
    for k in (1, 5, len(full) - 1):
        resumed = loader(k)
        assert len(resumed) == len(full) - k
        assert epoch_keys(resumed) == full[k:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmentations_are_a_function_of_stream_position(shards, num_workers):
    """A resumed run augments each batch exactly as the straight run did, whatever the global RNG."""
    def views(start, torch_seed):
        torch.manual_seed(torch_seed)
        loader = build_loader(shards, "train", batch_size=6, train=True, num_workers=num_workers,
                              seed=3, epoch=1, start_batch=start, transform="pretrain", views=2)
        transform = loader.device_transform()  # the default path: the paper's augmentation, two views
        return [transform(batch["image"], seed=batch["seed"]) for batch in loader]
    full = views(0, torch_seed=0)
    resumed = views(4, torch_seed=123)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_epoch = build_loader(shards, "train", batch_size=6, train=True, seed=3, epoch=2)
    assert next(iter(other_epoch))["seed"] != next(iter(build_loader(shards, "train", batch_size=6, train=True,
                                                                   seed=3, epoch=1)))["seed"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_leave_the_workers_as_uint8_at_the_training_size(shards, num_workers, shard_reader):
    stored = {s["key"]: s["image"] for s in shard_reader(shards, "test")}
    for batch in build_loader(shards, "test", batch_size=7, train=False, num_workers=num_workers):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 16, 16)
        for key, image in zip(batch["key"], batch["image"]):
            assert np.array_equal(image.permute(1, 2, 0).numpy(), stored[key])  # PNG: the exact pixels
    resized = next(iter(build_loader(shards, "test", batch_size=4, train=False, image_size=(12, 10))))
    assert resized["image"].shape == (4, 3, 12, 10) and resized["image"].dtype == torch.uint8


def test_resume_does_not_decode_skipped_samples(shards, monkeypatch):
    calls = []
    real = reader_module.load_image
    monkeypatch.setattr(reader_module, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    loader = build_loader(shards, "train", batch_size=8, train=True, start_batch=15)
    batches = list(loader)
    assert len(batches) == 168 // 8 - 15
    assert len(calls) == len(batches) * 8


def test_label_fraction_keeps_the_selected_subset_on_every_rank(shards):
    index = json.loads((shards / "index-train.json").read_text())
    chosen = {index["keys"][i] for i in select_label_fraction(index["labels"], 0.25, seed=0, task="multi-class")}
    seen = []
    for rank in range(2):
        loader = build_loader(shards, "train", batch_size=4, train=True, rank=rank, world_size=2,
                              label_fraction=0.25, seed=7, num_workers=2)
        keys = [k for batch in epoch_keys(loader) for k in batch]
        assert len(loader) == len(chosen) // 8
        seen.extend(keys)
    assert set(seen) <= chosen and len(seen) == len(set(seen)) == len(chosen) // 8 * 8
    evaluated = [k for r in range(3) for b in build_loader(shards, "train", batch_size=4, train=False, rank=r,
                                                           world_size=3, label_fraction=0.25) for k in b["key"]]
    assert sorted(evaluated) == sorted(chosen)


def test_the_device_transform_normalises_with_the_manifest_stats(shards):
    manifest = load_manifest(shards)
    loader = build_loader(shards, "test", batch_size=48, train=False)
    batch = next(iter(loader))
    [image] = loader.device_transform()(batch["image"], seed=batch["seed"])
    assert image.dtype == torch.float32 and image.shape == (48, 3, 16, 16)
    assert batch["label"].dtype == torch.int64
    mean = image.mean(dim=(0, 2, 3)).numpy() * np.array(manifest.image.std) + manifest.image.mean
    assert np.allclose(mean, manifest.image.mean, atol=0.08)  # test-split mean is near the train mean


def test_grayscale_sets_expand_to_three_channels_unless_asked(tmp_path):
    build_synthetic(tmp_path / "l", num_images=30, image_size=16, num_classes=2, shard_size=10, mode="L",
                    num_workers=0)
    loader = build_loader(tmp_path / "l", "train", batch_size=4, train=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 16, 16)  # the stored channel crosses the worker boundary
    [three] = loader.device_transform()(batch["image"], seed=0)
    [one] = build_loader(tmp_path / "l", "train", batch_size=4, train=False, channels=None).device_transform()(
        batch["image"], seed=0)
    assert three.shape[1] == 3 and one.shape[1] == 1
    assert torch.equal(three[:, 0], one[:, 0]) and torch.equal(three[:, 2], one[:, 0])


def test_multi_label_sets_yield_float_label_vectors(tmp_path):
    rng = np.random.default_rng(0)
    labels = [[int(v) for v in rng.integers(0, 2, 4)] for _ in range(40)]
    samples = [Sample(f"img{i}.png", label, split="train" if i < 30 else "test",
                      array=rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for i, label in enumerate(labels)]
    write_shards(SourceData(samples, ["a", "b", "c", "d"], "multi-label", "csv"), tmp_path / "ml",
                 WriteOptions(shard_size=8, workers=0, progress=False))
    index = json.loads((tmp_path / "ml" / "index-train.json").read_text())
    expected = dict(zip(index["keys"], index["labels"]))
    for train in (False, True):
        for batch in build_loader(tmp_path / "ml", "train", batch_size=5, train=train):
            assert batch["label"].dtype == torch.float32 and batch["label"].shape == (len(batch["key"]), 4)
            assert batch["label"].tolist() == [expected[k] for k in batch["key"]]


def corrupt(shard_dir: Path) -> dict[str, int]:
    """Damage train shards in four ways; return how many wanted samples each damage costs."""
    names = sorted(p.name for p in shard_dir.glob("train-*.tar"))

    def bad_image(name, data):
        return b"not an image" if name.endswith("0000003.png") else data

    def bad_labels(name, data):
        if name.endswith("0000021.json"):
            return b"{not json"
        if name.endswith("0000022.json"):
            return json.dumps({"label": 7, "source": "x"}).encode()
        if name.endswith("0000023.json"):
            return None
        return data

    rewrite_tar(shard_dir / names[0], bad_image)
    rewrite_tar(shard_dir / names[1], bad_labels)
    # Cut shard 2 inside its 16th sample: samples 15..19 of that shard are lost.
    path = shard_dir / names[2]
    with tarfile.open(path) as tar:
        cut_at = [m for m in tar.getmembers() if m.name.endswith(".png")][15].offset_data + 10
    path.write_bytes(path.read_bytes()[:cut_at])
    return {"image": 1, "labels": 3, "truncated": 5}


@pytest.fixture(scope="module")
def damaged(shards, tmp_path_factory) -> Path:
    out = copy_set(shards, tmp_path_factory.mktemp("damaged") / "shards")
    corrupt(out)
    return out


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2)])
def test_corrupted_samples_are_skipped_and_counted_exactly_in_evaluation(damaged, world_size, num_workers):
    seen, skipped = [], 0
    for rank in range(world_size):
        loader = build_loader(damaged, "train", batch_size=8, train=False, rank=rank, world_size=world_size,
                              num_workers=num_workers)
        seen.extend(k for batch in loader for k in batch["key"])
        skipped += loader.skipped()
    assert skipped == 1 + 3 + 5
    assert len(seen) == len(set(seen)) == 168 - skipped


def test_training_over_damaged_shards_skips_without_crashing(damaged):
    # 159 good samples = 3 x 53: with batch 53 the epoch consumes each good sample once, so counts are exact.
    loader = build_loader(damaged, "train", batch_size=53, train=True)
    batches = list(loader)
    assert len(batches) == 168 // 53 == 3 and all(len(b["key"]) == 53 for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 159
    assert loader.skipped() == 9


def test_unknown_manifest_version_is_refused(shards, tmp_path):
    out = copy_set(shards, tmp_path / "v99")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format_version 99"):
        build_loader(out, "train", batch_size=4, train=True)


def test_missing_index_and_bad_arguments_raise_clear_errors(shards, tmp_path):
    out = copy_set(shards, tmp_path / "noindex")
    (out / "index-test.json").unlink()
    with pytest.raises(ManifestError, match="index-test.json"):
        build_loader(out, "test", batch_size=4, train=False)
    with pytest.raises(ManifestError, match="split 'nope'"):
        build_loader(shards, "nope", batch_size=4, train=False)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_loader(shards, "test", batch_size=30, train=True, world_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        build_loader(shards, "test", batch_size=4, train=False, start_batch=1)
    with pytest.raises(ValueError, match="label_fraction"):
        build_loader(shards, "train", batch_size=4, train=True, label_fraction=1.5)
    with pytest.raises(ValueError, match="rank"):
        build_loader(shards, "train", batch_size=4, train=True, rank=2, world_size=2)

"""Shard writing: manifest contents, statistics, determinism, atomicity, overwrite, dedupe, verify."""

import json
import multiprocessing
import os
import shutil
import tarfile

import numpy as np
import pytest

from cass_dist.data import images
from cass_dist.data.manifest import load_manifest
from cass_dist.data.sources import Sample, SourceData, read_folder
from cass_dist.data.splits import class_weights
from cass_dist.data.synthetic import build_synthetic, synthetic_source
from cass_dist.data.verify import verify_shards
from cass_dist.data.writer import STAGES, OutputExistsError, WriteOptions, recover_output, write_shards

FAST = dict(workers=0, progress=False)


def test_synthetic_set_is_complete_and_consistent(synthetic_shards, shard_reader):
    manifest = load_manifest(synthetic_shards)
    assert verify_shards(synthetic_shards) == []
    assert {k: v.count for k, v in manifest.splits.items()} == {"train": 168, "val": 24, "test": 48}
    assert manifest.splits["train"].class_counts == [28] * 6
    assert all(len(s.shards) <= 3 for s in manifest.splits.values())
    assert manifest.image.size == [32, 32] and manifest.task == "multi-class"
    train = shard_reader(synthetic_shards, "train")
    index = json.loads((synthetic_shards / "index-train.json").read_text())
    assert index == {"keys": [s["key"] for s in train], "labels": [s["label"] for s in train]}
    assert [s["key"] for s in train] == [f"train-{i:07d}" for i in range(168)]
    pixels = np.stack([s["image"] for s in train]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(manifest.image.mean, pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(manifest.image.std, pixels.std(0), atol=1e-5)


def test_synthetic_is_deterministic_and_classes_differ(tmp_path):
    a = build_synthetic(tmp_path / "a", num_images=60, image_size=16, shard_size=20, num_workers=0)
    b = build_synthetic(tmp_path / "b", num_images=60, image_size=16, shard_size=20, num_workers=0)
    assert [s.sha256 for s in a.splits["train"].shards] == [s.sha256 for s in b.splits["train"].shards]
    data = synthetic_source(num_images=300, image_size=32, seed=0)
    means = np.array([np.mean([s.array.mean((0, 1)) for s in data.samples if s.label == c], 0) for c in range(6)])
    spread = min(np.abs(means[i] - means[j]).max() for i in range(6) for j in range(i + 1, 6))
    assert spread > 10  # every pair of classes differs in mean colour by more than 10 grey levels


def test_class_weights_inverse_frequency_mean_one():
    weights = class_weights([0] * 60 + [1] * 30 + [2] * 10, 4, "multi-class")
    assert np.mean(weights) == pytest.approx(1.0)
    assert weights[3] == 0  # absent class
    assert weights[0] * 60 == pytest.approx(weights[1] * 30, rel=1e-4) == pytest.approx(weights[2] * 10, rel=1e-4)
    ml = class_weights([[1, 0], [1, 1], [1, 0], [0, 1]], 2, "multi-label")
    assert ml == pytest.approx([2 * (1 / 3) / (1 / 3 + 1 / 2), 2 * (1 / 2) / (1 / 3 + 1 / 2)], rel=1e-4)


def test_finished_output_is_not_rewritten_without_overwrite(tmp_path):
    data = synthetic_source(num_images=30, image_size=8)
    first = write_shards(data, tmp_path, WriteOptions(**FAST))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_shards(data, tmp_path, WriteOptions(**FAST))
    second = write_shards(data, tmp_path, WriteOptions(shard_size=7, overwrite=True, **FAST))
    assert first.splits["train"].count == second.splits["train"].count == 24  # 4 of each class's 5
    assert [s.count for s in second.splits["train"].shards] == [7, 7, 7, 3]
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [f"train-{i:06d}.tar" for i in range(4)]
    assert verify_shards(tmp_path) == []


def test_failed_overwrite_keeps_the_finished_set(tmp_path, folder_maker):
    folder_maker(tmp_path / "d", {"a": 5, "b": 5}, size=(8, 8))
    before = write_shards(read_folder(tmp_path / "d"), tmp_path / "out", WriteOptions(**FAST))
    (tmp_path / "d" / "b" / "zz.png").write_bytes(b"truncated")
    with pytest.raises(images.ImageError, match="zz.png"):
        write_shards(read_folder(tmp_path / "d"), tmp_path / "out", WriteOptions(overwrite=True, **FAST))
    assert load_manifest(tmp_path / "out") == before and verify_shards(tmp_path / "out") == []


def test_truncated_image_mid_conversion_leaves_nothing(tmp_path, folder_maker):
    folder_maker(tmp_path / "d", {"a": 12, "b": 12}, size=(32, 32))
    whole = (tmp_path / "d/b/img (3).png").read_bytes()
    (tmp_path / "d/b/img (3).png").write_bytes(whole[: len(whole) // 2])  # header fine, pixels cut
    with pytest.raises(images.ImageError, match=r"img \(3\).png: cannot decode"):
        write_shards(read_folder(tmp_path / "d"), tmp_path / "out", WriteOptions(shard_size=2, **FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no output, no half-built set beside it


def test_interrupted_run_leaves_nothing_complete_and_rerun_cleans(tmp_path, monkeypatch):
    data = synthetic_source(num_images=60, image_size=8)
    real, calls = images.convert, []

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 45:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "convert", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_shards(data, tmp_path, WriteOptions(shard_size=10, **FAST))
    assert list(tmp_path.iterdir()) == []  # not one shard under its final name, no temp file
    monkeypatch.setattr(images, "convert", real)
    # A hard kill (no cleanup) leaves temp files and manifest-less shards: the next run removes them.
    (tmp_path / ".train-000000.tar.tmp-999").write_bytes(b"half")
    (tmp_path / "train-000009.tar").write_bytes(b"orphan")
    write_shards(data, tmp_path, WriteOptions(shard_size=10, **FAST))
    assert not (tmp_path / ".train-000000.tar.tmp-999").exists() and not (tmp_path / "train-000009.tar").exists()
    assert verify_shards(tmp_path) == []


def test_pool_conversion_equals_in_process(tmp_path):
    data = synthetic_source(num_images=300, image_size=16)
    a = write_shards(data, tmp_path / "a", WriteOptions(workers=0, progress=False))
    b = write_shards(data, tmp_path / "b", WriteOptions(workers=2, progress=False))
    assert a.to_dict()["splits"] == b.to_dict()["splits"]


def test_cross_split_duplicates_reported_and_deduped(tmp_path, folder_maker):
    pixels = folder_maker(tmp_path / "d", {"Training/a": 10, "Training/b": 10, "Testing/a": 4, "Testing/b": 4},
                          size=(8, 8))
    for i in range(3):  # three test images are byte-identical copies of training images
        shutil.copy(tmp_path / f"d/Training/a/img ({i}).png", tmp_path / f"d/Testing/a/copy {i}.png")
    assert len(pixels) == 28
    data = read_folder(tmp_path / "d")
    kept = write_shards(data, tmp_path / "kept", WriteOptions(**FAST))
    assert kept.duplicates["cross_split_groups"] == 3 and kept.duplicates["dropped"] == 0
    assert kept.splits["test"].count == 11
    deduped = write_shards(data, tmp_path / "dd", WriteOptions(dedupe=True, **FAST))
    assert deduped.duplicates["dropped"] == 3 and deduped.splits["test"].count == 8
    assert deduped.splits["train"].count + deduped.splits["val"].count == 20


def test_jpeg_resize_mixed_sizes(tmp_path, folder_maker):
    folder_maker(tmp_path / "d", {"a": 6}, size=(40, 60))
    folder_maker(tmp_path / "d", {"b": 6}, size=(50, 30), seed=1)
    options = WriteOptions(image=images.ImageOptions(format="jpg", resize=20, quality=90), **FAST)
    manifest = write_shards(read_folder(tmp_path / "d"), tmp_path / "out", options)
    assert manifest.image.size is None and manifest.image.format == "jpg"
    with tarfile.open(tmp_path / "out" / manifest.splits["train"].shards[0].name) as tar:
        assert all(n.endswith((".jpg", ".json")) for n in tar.getnames())
    assert verify_shards(tmp_path / "out") == []


def test_jpeg_in_jpeg_out_keeps_the_file_bytes(tmp_path, shard_reader):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"d/{c}/{i}.jpg")
    options = WriteOptions(image=images.ImageOptions(format="jpg"), **FAST)
    manifest = write_shards(read_folder(tmp_path / "d"), tmp_path / "out", options)
    for split in manifest.splits:
        with tarfile.open(tmp_path / "out" / manifest.splits[split].shards[0].name) as tar:
            stored = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
        for sample in shard_reader(tmp_path / "out", split):
            assert stored[sample["key"] + ".jpg"] == (tmp_path / "d" / sample["source"]).read_bytes()


def test_multilabel_manifest_counts_positives(tmp_path):
    rng = np.random.default_rng(0)
    samples = [Sample(f"s{i}", rng.integers(0, 2, 3).tolist(), array=np.full((4, 4), i, np.uint8))
               for i in range(40)]
    manifest = write_shards(SourceData(samples, ["x", "y", "z"], "multi-label", "test"), tmp_path,
                            WriteOptions(image=images.ImageOptions(mode="L"), **FAST))
    total = np.zeros(3, int)
    for split in manifest.splits.values():
        total += split.class_counts
    assert total.tolist() == np.sum([s.label for s in samples], 0).tolist()


@pytest.fixture
def damaged(synthetic_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_shards, copy)
    return copy


def test_verify_finds_flipped_byte(damaged):
    shard = damaged / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    problems = verify_shards(damaged)
    assert any("train-000001.tar: sha256" in p for p in problems)


def test_verify_finds_truncated_missing_and_stray_shards(damaged):
    shard = damaged / "test-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    (damaged / "val-000000.tar").unlink()
    shutil.copy(damaged / "train-000000.tar", damaged / "train-000007.tar")
    problems = "\n".join(verify_shards(damaged))
    assert "test-000000.tar: 5000 bytes" in problems
    assert "val-000000.tar: missing" in problems
    assert "train-000007.tar: shard not listed" in problems


def test_verify_without_manifest(tmp_path):
    assert "manifest.json not found" in verify_shards(tmp_path)[0]


def _write_and_die(data, out, stage, exchange):
    """Child process: overwrite ``out`` and die like a SIGKILL (no cleanup) when the writer reaches ``stage``."""
    from cass_dist.data import output, writer

    if not exchange:
        output._exchange = lambda a, b: False  # the two-rename path (file systems without RENAME_EXCHANGE)

    def hook(name):
        if name == stage:
            os._exit(9)
    writer.write_shards(data, out, WriteOptions(shard_size=10, overwrite=True, **FAST), on_stage=hook)
    os._exit(0)


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("stage", STAGES)
def test_overwrite_killed_at_any_stage_leaves_the_old_set_or_the_new_one(tmp_path, stage, exchange):
    out = tmp_path / "out"
    old = write_shards(synthetic_source(num_images=30, image_size=8, seed=1), out, WriteOptions(**FAST))
    (out / "NOTES.txt").write_text("the user's own file")
    new_data = synthetic_source(num_images=40, image_size=8, seed=2)
    new = write_shards(new_data, tmp_path / "reference", WriteOptions(shard_size=10, **FAST))

    child = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(new_data, out, stage, exchange))
    child.start()
    child.join(60)
    reached = stage != "old-moved" or not exchange  # one atomic exchange has no "old moved" moment
    assert child.exitcode == (9 if reached else 0)
    if (out / "manifest.json").exists():  # right after the kill: a complete set is in place ...
        assert load_manifest(out) in (old, new) and verify_shards(out) == []
    else:  # ... except between the two fallback renames, where both sets wait, complete, beside it
        assert stage == "old-moved" and not exchange
        beside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert sorted(load_manifest(p) == new for p in beside) == [False, True]

    recover_output(out)  # what any later run does first
    assert load_manifest(out) == (old if stage in ("shards", "manifest") else new)
    assert verify_shards(out) == []
    assert (out / "NOTES.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]  # nothing stale is left


def test_a_write_without_overwrite_cleans_what_a_killed_run_left(tmp_path):
    out = tmp_path / "out"
    write_shards(synthetic_source(num_images=30, image_size=8), out, WriteOptions(**FAST))
    (tmp_path / ".out.new-4242").mkdir()  # a half-built set of a killed run, and a stale temp file
    (tmp_path / ".out.new-4242" / "train-000000.tar").write_bytes(b"half")
    (out / ".index-train.json.tmp-4242").write_text("{")
    with pytest.raises(OutputExistsError):
        write_shards(synthetic_source(num_images=30, image_size=8), out, WriteOptions(**FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / ".index-train.json.tmp-4242").exists() and verify_shards(out) == []


def test_shards_written_at_the_training_size_and_as_raw_pixels(tmp_path, folder_maker):
    from cass_dist.data.transforms import decode_image

    folder_maker(tmp_path / "d", {"a": 6, "b": 6}, size=(40, 60))
    for fmt in ("jpg", "npy"):
        options = WriteOptions(image=images.ImageOptions(format=fmt, resize=[24, 20]), **FAST)
        manifest = write_shards(read_folder(tmp_path / "d"), tmp_path / fmt, options)
        assert manifest.image.size == [24, 20] and manifest.image.format == fmt and manifest.format_version == 2
        assert verify_shards(tmp_path / fmt) == []
        with tarfile.open(tmp_path / fmt / manifest.splits["train"].shards[0].name) as tar:
            member = next(m for m in tar if m.name.endswith(f".{fmt}"))
            assert decode_image(tar.extractfile(member).read(), "RGB").shape == (3, 24, 20)
    raw = load_manifest(tmp_path / "npy").splits["train"].shards[0]
    assert raw.bytes > 24 * 20 * 3 * raw.count  # what raw pixels cost on disk: every byte of every image


def test_the_same_input_gives_the_same_shard_bytes_through_tarwriter(tmp_path):
    data = synthetic_source(num_images=60, image_size=8)
    a = write_shards(data, tmp_path / "a", WriteOptions(shard_size=20, **FAST))
    b = write_shards(data, tmp_path / "b", WriteOptions(shard_size=20, **FAST))
    assert [s.sha256 for s in a.splits["train"].shards] == [s.sha256 for s in b.splits["train"].shards]
    with tarfile.open(tmp_path / "a" / a.splits["train"].shards[0].name) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uname, m.mode) for m in members} == {(0, "bigdata", 0o444)}

"""The real datasets in ../shared/data convert and verify (skipped on a clone without them)."""

import hashlib
from collections import Counter

import numpy as np
import pytest

from cass_dist.data.__main__ import main
from cass_dist.data.manifest import load_manifest
from cass_dist.data.verify import verify_shards

pytestmark = pytest.mark.shared_data
FAST = ["--workers", "2", "--no-progress"]


def _convert(argv: list[str]):
    assert main(argv + FAST) == 0
    out = argv[argv.index("--out") + 1]
    assert verify_shards(out) == []
    return load_manifest(out)


def test_breastmnist_official_splits_and_pixels(shared_data, tmp_path, shard_reader):
    root = shared_data / "breastmnist"
    manifest = _convert(["medmnist", "breastmnist", "--root", str(root), "--mode", "L", "--out", str(tmp_path)])
    assert manifest.task == "binary" and manifest.class_names == ["malignant", "normal, benign"]
    counts = {name: (s.count, s.class_counts) for name, s in manifest.splits.items()}
    assert counts == {"train": (546, [147, 399]), "val": (78, [21, 57]), "test": (156, [42, 114])}
    with np.load(root / "breastmnist.npz") as npz:
        images, labels = npz["test_images"], npz["test_labels"]
    for sample in shard_reader(tmp_path, "test"):
        i = int(sample["source"].rsplit("/", 1)[1])
        np.testing.assert_array_equal(sample["image"], images[i])
        assert sample["label"] == int(labels[i, 0])


def test_pneumoniamnist_counts(shared_data, tmp_path):
    manifest = _convert(["medmnist", "pneumoniamnist", "--root", str(shared_data / "pneumoniamnist"),
                         "--shard-size", "2000", "--out", str(tmp_path)])
    assert {n: s.class_counts for n, s in manifest.splits.items()} == {
        "train": [1214, 3494], "val": [135, 389], "test": [234, 390]}
    assert manifest.image.mode == "RGB" and manifest.image.size == [28, 28]


def test_brain_mri_duplicates_are_reported_and_deduped(shared_data, tmp_path, shard_reader):
    root = shared_data / "brain_tumor_mri"
    manifest = _convert(["folder", str(root), "--resize", "64", "--dedupe", "--out", str(tmp_path)])
    assert manifest.class_names == ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"]
    # An independent count: Testing files whose bytes also occur under Training.
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*/*/*.jpg")}
    training = {d for p, d in digest.items() if p.parts[-3] == "Training"}
    testing = [p for p, d in digest.items() if p.parts[-3] == "Testing"]
    shared = {digest[p] for p in testing if digest[p] in training}
    assert manifest.duplicates["cross_split_groups"] == len(shared) == 34  # SOURCE.md: 34 groups
    dropped = sum(digest[p] in training for p in testing)
    assert manifest.duplicates["dropped"] == dropped
    assert manifest.splits["test"].count == len(testing) - dropped
    assert manifest.splits["train"].count + manifest.splits["val"].count == len(digest) - len(testing)
    sources, keys = [], []
    for split in manifest.splits:
        for sample in shard_reader(tmp_path, split):
            sources.append(sample["source"])
            keys.append(sample["key"])
            assert min(sample["image"].shape[:2]) == 64
    assert len(set(keys)) == len(keys) and len(set(sources)) == len(sources)
    test_sources = [s for s in sources if s.startswith("Testing/")]
    assert not {digest[root / s] for s in test_sources} & training


def test_ham10000_csv_multiclass_and_multilabel(shared_data, tmp_path):
    table = shared_data / "ham10000_sample" / "labels.csv"
    common = ["csv", str(table), "--image-col", "image_path", "--resize", "64", "--format", "jpg"]
    manifest = _convert(common + ["--label-col", "dx", "--out", str(tmp_path / "mc")])
    assert manifest.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert {n: s.class_counts for n, s in manifest.splits.items()} == {
        "train": [7] * 7, "val": [1] * 7, "test": [2] * 7}
    cols = "akiec,bcc,bkl,df,mel,nv,vasc"
    multi = _convert(common + ["--label-cols", cols, "--out", str(tmp_path / "ml")])
    assert multi.task == "multi-label"
    assert Counter({n: s.count for n, s in multi.splits.items()}) == Counter({"train": 49, "val": 7, "test": 14})

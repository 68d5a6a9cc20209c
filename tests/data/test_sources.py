"""Each source round-trips exactly (PNG), and each kind of bad input fails with a clear error."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cass_dist.data import images
from cass_dist.data.images import ImageError, ImageOptions
from cass_dist.data.sources import SourceError, read_csv, read_folder, read_medmnist
from cass_dist.data.writer import WriteOptions, write_shards

FAST = dict(workers=0, progress=False)


def _write_npz(path: Path, flag_images: dict, flag_labels: dict, drop: str | None = None) -> None:
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = flag_images[split]
        arrays[f"{split}_labels"] = flag_labels[split]
    arrays.pop(drop, None)
    np.savez(path, **arrays)


def _fake_medmnist(tmp_path, flag, shape, label_fn, n=(12, 4, 6)):
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 256, size=(k, *shape), dtype=np.uint8) for s, k in zip(("train", "val", "test"), n)}
    labels = {s: label_fn(rng, k) for s, k in zip(("train", "val", "test"), n)}
    return imgs, labels


@pytest.mark.parametrize("flag,shape,mode,label_fn,task", [
    ("breastmnist", (28, 28), "L", lambda r, k: r.integers(0, 2, (k, 1)), "binary"),
    ("retinamnist", (28, 28, 3), "RGB", lambda r, k: r.integers(0, 5, (k, 1)), "multi-class"),
    ("chestmnist", (28, 28), "L", lambda r, k: r.integers(0, 2, (k, 14)), "multi-label"),
])
def test_medmnist_round_trip(tmp_path, shard_reader, flag, shape, mode, label_fn, task):
    imgs, labels = _fake_medmnist(tmp_path, flag, shape, label_fn)
    _write_npz(tmp_path / f"{flag}.npz", imgs, labels)
    data = read_medmnist(flag, root=tmp_path)
    assert data.task == task
    manifest = write_shards(data, tmp_path / "out", WriteOptions(image=ImageOptions(mode=mode), **FAST))
    assert {s: manifest.splits[s].count for s in manifest.splits} == {"train": 12, "val": 4, "test": 6}
    for split in ("train", "val", "test"):
        for sample in shard_reader(tmp_path / "out", split):
            index = int(sample["source"].rsplit("/", 1)[1])
            np.testing.assert_array_equal(sample["image"], imgs[split][index])
            expected = labels[split][index].tolist()
            assert sample["label"] == (expected if task == "multi-label" else expected[0])


def test_folder_round_trip_with_split_folders_and_repeated_names(tmp_path, folder_maker, shard_reader):
    layout = {"Training/glioma": 20, "Training/no tumor": 10, "Testing/glioma": 5, "Testing/no tumor": 5}
    pixels = folder_maker(tmp_path / "mri", layout, name="image({i}).png")
    data = read_folder(tmp_path / "mri")
    assert data.class_names == ["glioma", "no tumor"] and data.task == "binary"
    manifest = write_shards(data, tmp_path / "out", WriteOptions(**FAST))
    assert manifest.splits["test"].count == 10
    assert manifest.splits["train"].count + manifest.splits["val"].count == 30
    assert manifest.splits["val"].class_counts == [2, 1]  # 10% of train, stratified
    seen = set()
    for split in ("train", "val", "test"):
        for sample in shard_reader(tmp_path / "out", split):
            assert sample["source"].startswith("Testing/" if split == "test" else "Training/")
            np.testing.assert_array_equal(sample["image"], pixels[sample["source"]])
            assert sample["label"] == data.class_names.index(sample["source"].split("/")[1])
            seen.add(sample["key"])
    assert len(seen) == 40  # keys unique although every class has image(0).png ...


def test_folder_without_split_folders_is_split_stratified(tmp_path, folder_maker):
    folder_maker(tmp_path / "d", {"a": 30, "b": 20, "c": 10}, size=(8, 8))
    manifest = write_shards(read_folder(tmp_path / "d"), tmp_path / "out", WriteOptions(**FAST))
    assert manifest.splits["train"].class_counts == [21, 14, 7]
    assert manifest.splits["val"].class_counts == [3, 2, 1]
    assert manifest.splits["test"].class_counts == [6, 4, 2]


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_multiclass_and_multilabel_round_trip(tmp_path, folder_maker, shard_reader):
    pixels = folder_maker(tmp_path, {"imgs": 30}, size=(10, 12))
    rels = sorted(pixels)
    rows = [[rel, ["nv", "mel", "bcc"][i % 3], int(i % 2 == 0), int(i % 3 == 0), f"p{i // 2}"]
            for i, rel in enumerate(rels)]
    table = _csv(tmp_path / "labels.csv", ["path", "dx", "a", "b", "patient"], rows)
    data = read_csv(table, image_col="path", label_col="dx", group_col="patient")
    assert data.class_names == ["bcc", "mel", "nv"]
    write_shards(data, tmp_path / "mc", WriteOptions(**FAST))
    split_of = {}
    for split in ("train", "val", "test"):
        for sample in shard_reader(tmp_path / "mc", split):
            row = rows[rels.index(sample["source"])]
            np.testing.assert_array_equal(sample["image"], pixels[sample["source"]])
            assert sample["label"] == data.class_names.index(row[1])
            assert split_of.setdefault(row[4], split) == split  # a patient never spans two splits
    ml = read_csv(table, image_col="path", label_cols=["a", "b"])
    assert ml.task == "multi-label"
    manifest = write_shards(ml, tmp_path / "ml", WriteOptions(**FAST))
    for split in manifest.splits:
        for sample in shard_reader(tmp_path / "ml", split):
            row = rows[rels.index(sample["source"])]
            assert sample["label"] == [row[2], row[3]]


def test_csv_split_column_is_kept(tmp_path, folder_maker):
    pixels = folder_maker(tmp_path, {"x": 9}, size=(8, 8))
    rows = [[rel, i % 2, ["train", "Validation", "TEST"][i % 3]] for i, rel in enumerate(sorted(pixels))]
    data = read_csv(_csv(tmp_path / "t.csv", ["f", "y", "s"], rows), image_col="f", label_col="y", split_col="s")
    manifest = write_shards(data, tmp_path / "out", WriteOptions(**FAST))
    assert {k: v.count for k, v in manifest.splits.items()} == {"train": 3, "val": 3, "test": 3}


# --- bad input ------------------------------------------------------------------------------------

def test_csv_missing_images_lists_first_few_and_count(tmp_path):
    rows = [[f"gone/{i}.png", "a"] for i in range(9)]
    with pytest.raises(SourceError, match=r"gone/0.png.*\(9 in all\)") as err:
        read_csv(_csv(tmp_path / "t.csv", ["f", "y"], rows), image_col="f", label_col="y")
    assert "t.csv" in str(err.value)


def test_csv_missing_columns_named(tmp_path):
    table = _csv(tmp_path / "t.csv", ["f", "y"], [["a.png", "0"]])
    with pytest.raises(SourceError, match=r"no column\(s\) \['dx'\].*columns are \['f', 'y'\]"):
        read_csv(table, image_col="f", label_col="dx")


def test_csv_unknown_and_empty_labels(tmp_path, folder_maker):
    pixels = folder_maker(tmp_path, {"x": 3}, size=(8, 8))
    rows = [[rel, y] for rel, y in zip(sorted(pixels), ["a", "b", "zz"])]
    table = _csv(tmp_path / "t.csv", ["f", "y"], rows)
    with pytest.raises(SourceError, match=r"column 'y' has unknown label values zz"):
        read_csv(table, image_col="f", label_col="y", classes=["a", "b"])
    rows[1][1] = ""
    with pytest.raises(SourceError, match=r"column 'y' is empty on lines 3"):
        read_csv(_csv(tmp_path / "u.csv", ["f", "y"], rows), image_col="f", label_col="y")


def test_csv_multilabel_not_01(tmp_path, folder_maker):
    pixels = folder_maker(tmp_path, {"x": 2}, size=(8, 8))
    rows = [[rel, 1, v] for rel, v in zip(sorted(pixels), ["0", "2"])]
    with pytest.raises(SourceError, match=r"column 'b' must hold 0 or 1, found '2' on line 3"):
        read_csv(_csv(tmp_path / "t.csv", ["f", "a", "b"], rows), image_col="f", label_cols=["a", "b"])


def test_empty_class_folder_named(tmp_path, folder_maker):
    folder_maker(tmp_path / "d", {"a": 2}, size=(8, 8))
    (tmp_path / "d" / "b").mkdir()
    (tmp_path / "d" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(SourceError, match=r"without any image.*d/b"):
        read_folder(tmp_path / "d")


def test_unreadable_image_fails_before_any_shard(tmp_path, folder_maker):
    folder_maker(tmp_path / "d", {"a": 3, "b": 3}, size=(8, 8))
    (tmp_path / "d" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match=r"broken.png"):
        write_shards(read_folder(tmp_path / "d"), tmp_path / "out", WriteOptions(**FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no output and nothing half-built beside it


def test_npz_missing_keys_and_bad_labels(tmp_path):
    imgs, labels = _fake_medmnist(tmp_path, "breastmnist", (28, 28), lambda r, k: r.integers(0, 2, (k, 1)))
    _write_npz(tmp_path / "breastmnist.npz", imgs, labels, drop="val_labels")
    with pytest.raises(SourceError, match=r"breastmnist.npz lacks keys \['val_labels'\]"):
        read_medmnist("breastmnist", root=tmp_path)
    labels["test"][0, 0] = 7
    _write_npz(tmp_path / "breastmnist.npz", imgs, labels)
    with pytest.raises(SourceError, match=r"test_labels has values outside 0..1 at rows 0"):
        read_medmnist("breastmnist", root=tmp_path)
    with pytest.raises(SourceError, match="unknown dataset 'nosuchmnist'"):
        read_medmnist("nosuchmnist", root=tmp_path)
    with pytest.raises(SourceError, match=r"breastmnist_64.npz"):
        read_medmnist("breastmnist", size=64, root=tmp_path)


def test_medmnist_failed_download_suggests_root(tmp_path, monkeypatch):
    import cass_dist.data.sources as sources

    def offline(flag, size, root):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(sources, "_download_medmnist", offline)
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    with pytest.raises(SourceError, match=r"could not download breastmnist.npz.*--root"):
        read_medmnist("breastmnist")


# --- image normalisation --------------------------------------------------------------------------

def test_to_8bit_handles_16bit_alpha_palette_and_modes(tmp_path):
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")  # a 16-bit grayscale PNG
    out = images.to_8bit(Image.open(tmp_path / "w.png"), "L")
    assert out.mode == "L" and np.asarray(out).tolist() == [[0, 100, 255]]
    rgba = Image.fromarray(np.array([[[200, 100, 50, 255], [200, 100, 50, 0]]], dtype=np.uint8), "RGBA")
    assert np.asarray(images.to_8bit(rgba, "RGB")).tolist() == [[[200, 100, 50], [0, 0, 0]]]
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    assert np.asarray(images.to_8bit(palette, "RGB")).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    assert images.to_8bit(Image.new("1", (2, 2)), "RGB").mode == "RGB"


def test_convert_resizes_short_side_and_encodes_jpeg():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(40, 100, 3), dtype=np.uint8)
    encoded, hw, stats = images.convert(array, ImageOptions(mode="L", format="jpg", quality=80, resize=20))
    decoded = Image.open(__import__("io").BytesIO(encoded))
    assert decoded.format == "JPEG" and decoded.mode == "L" and hw == (20, 50) and decoded.size == (50, 20)
    assert stats.shape == (1, 2)


def test_bad_image_options_name_the_field():
    with pytest.raises(ValueError, match="format"):
        ImageOptions(format="gif").validate()
    with pytest.raises(ValueError, match="resize"):
        ImageOptions(resize=0).validate()

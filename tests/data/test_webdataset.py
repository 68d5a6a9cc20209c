"""Our shards are plain WebDataset, and plain WebDataset shards (plus a manifest) are ours."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.data import build_loader, load_manifest
from cass_dist.data.__main__ import main as cass_shards
from cass_dist.data.adopt import AdoptError, adopt_shards
from cass_dist.data.synthetic import render
from cass_dist.data.verify import verify_shards
from cass_dist.engine.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test trains in-process


def test_plain_webdataset_reads_our_shards(synthetic_shards, shard_reader):
    manifest = load_manifest(synthetic_shards)
    urls = [str(synthetic_shards / s.name) for s in manifest.split("train").shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"))
    index = json.loads((synthetic_shards / "index-train.json").read_text())
    assert [s["__key__"] for s in samples] == index["keys"]
    assert [s["json"]["label"] for s in samples] == index["labels"]
    ours = {s["key"]: s["image"] for s in shard_reader(synthetic_shards, "train")}
    assert all(np.array_equal(s["png"], ours[s["__key__"]]) for s in samples)


def write_plain_webdataset(out, *, per_split=(("train", 96), ("val", 24)), image_size=32, label_as="cls"):
    """Shards as any WebDataset user writes them: ShardWriter, <key>.jpg + <key>.cls (or .json)."""
    out.mkdir()
    for split, count in per_split:
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=40, verbose=0) as sink:
            for i in range(count):
                label = i % 3
                buffer = io.BytesIO()
                Image.fromarray(render(i, label, image_size=image_size, num_classes=3, seed=0)).save(buffer, "JPEG")
                sample = {"__key__": f"{split}/{i:05d}", "jpg": buffer.getvalue()}
                sample.update({"cls": str(label)} if label_as == "cls" else {"json": {"label": label}})
                sink.write(sample)


def test_shards_written_by_plain_shardwriter_train_once_adopted(tmp_path):
    shards = tmp_path / "wds"
    write_plain_webdataset(shards)
    assert cass_shards(["adopt", str(shards), "--split", "train=train-*.tar", "--split", "val=val-*.tar",
                        "--classes", "a,b,c"]) == 0
    manifest = load_manifest(shards)
    assert manifest.split("train").count == 96 and manifest.image.format == "jpg" and manifest.image.size == [32, 32]
    assert verify_shards(shards) == []
    batch = next(iter(build_loader(shards, "val", batch_size=24, train=False)))
    assert batch["key"][0] == "val/00000" and batch["label"].tolist() == [i % 3 for i in range(24)]

    cfg = parse_pretrain_config([
        "--data", str(shards), "--output-dir", str(tmp_path / "run"), "--cnn", "test_resnet", "--vit", "test_vit",
        "--model.vit_patch_size", "8", "--embed-dim", "16", "--image-size", "32", "--batch-size", "16",
        "--precision", "fp32", "--model.channels_last", "false", "--max-steps", "6", "--log-every", "2",
        "--knn-every", "6"])
    summary = pretrain(cfg)  # the default path: two views of the paper's augmentation, on the CPU "device"
    assert summary.steps == 6 and summary.skipped_samples == 0 and np.isfinite(summary.final_loss)
    knn = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_acc_cnn" in record for record in knn)


def test_adopt_reads_json_labels_and_refuses_what_it_cannot_describe(tmp_path):
    shards = tmp_path / "json"
    write_plain_webdataset(shards, per_split=(("train", 30),), label_as="json")
    manifest = adopt_shards(shards, {"train": "train-*.tar"}, class_names=["a", "b", "c"])
    assert manifest.split("train").class_counts == [10, 10, 10]
    with pytest.raises(AdoptError, match="no shard matches"):
        adopt_shards(shards, {"train": "nothing-*.tar"}, class_names=["a", "b", "c"])
    with pytest.raises(AdoptError, match=r"class id in \[0, 2\)"):
        adopt_shards(shards, {"train": "train-*.tar"}, class_names=["a", "b"])
    with wds.TarWriter(str(shards / "train-000009.tar")) as sink:
        sink.write({"__key__": "lonely", "cls": "1"})
    with pytest.raises(AdoptError, match="'lonely' has no image"):
        adopt_shards(shards, {"train": "train-*.tar"}, class_names=["a", "b", "c"])


def test_a_loader_over_foreign_keys_still_resumes_exactly(tmp_path):
    shards = tmp_path / "wds"
    write_plain_webdataset(shards)
    adopt_shards(shards, {"train": "train-*.tar", "val": "val-*.tar"}, class_names=["a", "b", "c"])
    def keys(start):
        loader = build_loader(shards, "train", batch_size=8, train=True, seed=2, start_batch=start, num_workers=2)
        return [batch["key"] for batch in loader]
    full = keys(0)
    assert keys(5) == full[5:] and len(full) == 12
    assert torch.tensor([len(k) for k in full]).eq(8).all()

"""Loader workers: sized by default, persistent across epochs and evaluations, gpu decode plumbing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cass_dist.data import build_loader
from cass_dist.data import reader as reader_module
from cass_dist.data.gpu_decode import EncodedImages
from cass_dist.data.images import ImageOptions
from cass_dist.data.stream import auto_num_workers
from cass_dist.data.synthetic import build_synthetic, synthetic_source
from cass_dist.data.writer import WriteOptions, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("workers") / "shards"
    build_synthetic(out, num_images=240, image_size=16, num_classes=3, shard_size=20, num_workers=0)
    return out


def test_auto_workers_fit_the_machine_and_the_process_count():
    assert auto_num_workers("cuda", cores=16, local_processes=1) == 8  # capped at 8
    assert auto_num_workers("cuda", cores=32, local_processes=8) == 3  # 4 cores each, one for training
    assert auto_num_workers("cuda", cores=8, local_processes=8) == 0  # one core each: load in-process
    assert auto_num_workers("cpu", cores=2, local_processes=1) == 0  # the model needs the cores
    assert auto_num_workers("cpu", cores=32, local_processes=2) == 4
    os.environ["LOCAL_WORLD_SIZE"] = "4"  # restored by the conftest fixture
    assert auto_num_workers("cuda", cores=16) == 3


def record_iterations(monkeypatch, path: Path):
    """Make every ShardStream iteration (in whatever process: fork keeps the patch) append its pid to ``path``."""
    real = reader_module.ShardStream.__iter__

    def recording(self):
        with open(path, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        yield from real(self)
    monkeypatch.setattr(reader_module.ShardStream, "__iter__", recording)


@pytest.mark.parametrize("persistent", [True, False])
def test_training_workers_serve_every_epoch_without_restarting(shards, tmp_path, monkeypatch, persistent):
    log = tmp_path / "iterations"
    record_iterations(monkeypatch, log)
    loader = build_loader(shards, "train", batch_size=8, train=True, num_workers=2, seed=4,
                          persistent_workers=persistent)
    epochs = [[b["key"] for b in loader] for _ in range(3)]
    pids = log.read_text().split()
    assert len(pids) == (2 if persistent else 6)  # persistent: each worker started once for all 3 epochs
    assert os.getpid() not in map(int, pids)
    # Whatever the workers' life, epoch e holds what a fresh loader for epoch e holds.
    for epoch, keys in enumerate(epochs):
        fresh = build_loader(shards, "train", batch_size=8, train=True, num_workers=2, seed=4, epoch=epoch,
                             persistent_workers=False)
        assert keys == [b["key"] for b in fresh]


def test_an_epoch_left_early_restarts_the_workers_at_the_next_one(shards):
    loader = build_loader(shards, "train", batch_size=8, train=True, num_workers=2, seed=4)
    next(iter(loader))  # epoch 0 abandoned after one batch
    second = [b["key"] for b in loader]
    fresh = build_loader(shards, "train", batch_size=8, train=True, num_workers=2, seed=4, epoch=1)
    assert second == [b["key"] for b in fresh]


def test_evaluation_workers_persist_and_each_pass_is_exact(shards, tmp_path, monkeypatch):
    log = tmp_path / "iterations"
    record_iterations(monkeypatch, log)
    loader = build_loader(shards, "test", batch_size=7, train=False, num_workers=2)
    passes = [sorted(k for b in loader for k in b["key"]) for _ in range(3)]
    assert passes[0] == passes[1] == passes[2] and len(passes[0]) == 48
    assert len(set(log.read_text().split())) == 2  # the same two worker processes served all three passes


def test_gpu_decode_ships_jpeg_bytes_that_decode_where_they_are_moved(tmp_path):
    out = tmp_path / "jpg"
    write_shards(synthetic_source(num_images=60, image_size=24), out,
                 WriteOptions(image=ImageOptions(format="jpg", quality=95), workers=0, progress=False))
    cpu = next(iter(build_loader(out, "test", batch_size=6, train=False, image_size=16)))
    encoded = next(iter(build_loader(out, "test", batch_size=6, train=False, image_size=16, decode="gpu",
                                     num_workers=2)))
    assert isinstance(encoded["image"], EncodedImages) and len(encoded["image"]) == 6
    assert encoded["key"] == cpu["key"]
    decoded = encoded["image"].to("cpu")  # CPU "device": libjpeg, full size, then the same resize as on CUDA
    assert decoded.dtype == torch.uint8 and decoded.shape == cpu["image"].shape
    assert (decoded.float() - cpu["image"].float()).abs().mean() < 4  # full decode vs DCT-scaled: close
    png = tmp_path / "png"
    write_shards(synthetic_source(num_images=30, image_size=8), png, WriteOptions(workers=0, progress=False))
    with pytest.raises(ValueError, match="decode 'gpu' needs JPEG shards"):
        build_loader(png, "test", batch_size=6, train=False, decode="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_decode_equals_the_cpu_decode(tmp_path):
    out = tmp_path / "jpg"
    write_shards(synthetic_source(num_images=120, image_size=64), out,
                 WriteOptions(image=ImageOptions(format="jpg", quality=90), workers=0, progress=False))
    for batch in build_loader(out, "test", batch_size=8, train=False, image_size=48, decode="gpu"):
        on_gpu, on_cpu = batch["image"].to("cuda").cpu().float(), batch["image"].to("cpu").float()
        assert (on_gpu - on_cpu).abs().max() <= 4 and (on_gpu - on_cpu).abs().mean() < 0.5

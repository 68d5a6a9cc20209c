"""Fixtures for the data layer: a small synthetic shard set, and readers/makers of raw test data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A finished synthetic shard set: 240 RGB PNGs of 32 px, 6 classes, 70/10/20, at most 3 shards per split.

    Session-scoped and shared: treat it as read-only (copy it before damaging it).
    """
    from cass_dist.data.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "shards"
    build_synthetic(out, num_images=240, image_size=32, num_classes=6, seed=0, shard_size=64, num_workers=0)
    return out


def read_shards(shard_dir: Path, split: str) -> list[dict]:
    """Return every sample of a split in shard order: {"key", "image" (uint8 array), "label", "source"}."""
    from cass_dist.data.manifest import load_manifest

    manifest = load_manifest(shard_dir)
    samples = []
    for shard in manifest.split(split).shards:
        parts: dict[str, dict] = {}
        with tarfile.open(shard_dir / shard.name) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                parts.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for key, p in parts.items():
            meta = json.loads(p["json"])
            data = p.get("png", p.get("jpg"))
            samples.append({"key": key, "image": np.asarray(Image.open(io.BytesIO(data))),
                            "label": meta["label"], "source": meta["source"]})
    return samples


@pytest.fixture
def shard_reader():
    """The ``read_shards(shard_dir, split)`` helper, as a fixture."""
    return read_shards


def make_folder(root: Path, layout: dict[str, int], *, size=(20, 24), seed=0, mode="RGB",
                name="img ({i}).png") -> dict[str, np.ndarray]:
    """Write ``layout`` ({"<class>" or "<split>/<class>": count}) as PNGs; return {relative path: pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            rel = f"{folder}/{name.format(i=i)}"
            Image.fromarray(pixels).save(root / rel)
            written[rel] = pixels
    return written


@pytest.fixture
def folder_maker():
    """The ``make_folder(root, layout, ...)`` helper, as a fixture."""
    return make_folder

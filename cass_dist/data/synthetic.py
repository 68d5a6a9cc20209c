"""The built-in demo dataset: deterministic images whose classes differ in texture, blobs and colour.

Each class has its own stripe frequency and orientation, blob count and size, and hue; every image
jitters all of them and adds noise, so a network has to look at several cues rather than one pixel.
Image i depends only on (seed, i), so the set is identical on every machine.
"""

from __future__ import annotations

import colorsys
import math
import os

import numpy as np

from cass_dist.data.images import ImageOptions
from cass_dist.data.manifest import Manifest
from cass_dist.data.sources import Sample, SourceData
from cass_dist.data.writer import WriteOptions, write_shards

_FREQS = (2.0, 4.5, 7.0, 3.0, 6.0, 9.0)  # stripe cycles per image
_BLOB_COUNTS = (2, 9, 4, 14, 3, 6)
_BLOB_RADII = (0.17, 0.05, 0.11, 0.035, 0.14, 0.07)  # fraction of the image side


def render(index: int, label: int, *, image_size: int, num_classes: int, seed: int) -> np.ndarray:
    """Return image ``index`` of class ``label`` as a uint8 (H, W, 3) array; pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    k = label % len(_FREQS)
    rounds = label // len(_FREQS)  # more than six classes: shift the table so every class differs
    size = image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    theta = math.pi * ((label * 0.618034) % 1.0) + rng.normal(0, 0.12)
    freq = (_FREQS[k] + 1.3 * rounds) * rng.uniform(0.88, 1.12)
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
    count = max(1, _BLOB_COUNTS[k] + rounds + int(rng.integers(-1, 2)))
    radius = _BLOB_RADII[(k + rounds) % len(_BLOB_RADII)] * rng.uniform(0.8, 1.2)
    centres = rng.uniform(0.1, 0.9, size=(count, 2))
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    blobs = np.clip(np.exp(-d2 / (2 * radius**2)).sum(0), 0, 1)
    hue = (label / num_classes + rng.normal(0, 0.025)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, 0.65, 0.85))
    blob_colour = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.5, 1.0))
    image = base * (0.45 + 0.4 * stripes[..., None])
    image = image * (1 - blobs[..., None]) + blob_colour * blobs[..., None]
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 0.04, size=image.shape)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def synthetic_source(*, num_images: int = 3000, image_size: int = 64, num_classes: int = 6,
                     seed: int = 0) -> SourceData:
    """Return the demo dataset as a SourceData (balanced classes, no curator split).

    Raises ValueError when a size or count is out of range.
    """
    if num_images < num_classes:
        raise ValueError(f"num_images ({num_images}) must be >= num_classes ({num_classes})")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    labels = np.random.default_rng(seed).permutation(np.arange(num_images) % num_classes)
    samples = [Sample(f"synthetic/{i:07d}", int(label),
                      array=render(i, int(label), image_size=image_size, num_classes=num_classes, seed=seed))
               for i, label in enumerate(labels)]
    names = [f"pattern_{c}" for c in range(num_classes)]
    task = "binary" if num_classes == 2 else "multi-class"
    args = {"num_images": num_images, "image_size": image_size, "num_classes": num_classes, "seed": seed}
    return SourceData(samples, names, task, "synthetic", args)


def build_synthetic(out_dir: str | os.PathLike, *, num_images: int = 3000, image_size: int = 64,
                    num_classes: int = 6, seed: int = 0, image_format: str = "png", shard_size: int = 500,
                    overwrite: bool = False, num_workers: int | None = None, mode: str = "RGB",
                    quality: int = 95, progress: bool = False) -> Manifest:
    """Build the demo shard set in ``out_dir`` (stratified 70/10/20 split) and return its Manifest.

    Raises OutputExistsError when out_dir already holds a finished set and overwrite is false, and
    ValueError for out-of-range arguments.
    """
    data = synthetic_source(num_images=num_images, image_size=image_size, num_classes=num_classes, seed=seed)
    options = WriteOptions(image=ImageOptions(mode=mode, format=image_format, quality=quality),
                           shard_size=shard_size, seed=seed, workers=num_workers, overwrite=overwrite,
                           progress=progress)
    return write_shards(data, out_dir, options)

"""Existing WebDataset shards -> the index files and manifest.json that make them a cass-dist shard set.

Shards written by any WebDataset tool (``webdataset.ShardWriter``, ``tarp``, img2dataset ...) load
as they are once a manifest describes them: ``cass-shards adopt DIR --split train='train-*.tar' ...``.
Each sample needs one image (``png``, ``jpg``/``jpeg`` or ``npy``) and a label, either
``<key>.cls`` (a class id as text, webdataset's convention) or ``<key>.json`` with ``{"label": ...}``.
Every image is decoded once, for the checks and the train statistics; the tars are not changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from webdataset import tariterators

from cass_dist.data.manifest import (
    MANIFEST_NAME,
    TASKS,
    ImageInfo,
    Manifest,
    ShardInfo,
    SplitInfo,
    sha256_of,
    write_json_atomic,
)
from cass_dist.data.reader import IMAGE_EXTENSIONS, _parse_label
from cass_dist.data.splits import class_counts, class_weights
from cass_dist.data.transforms import decode_image
from cass_dist.errors import CassError

FORMAT_OF = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "npy": "npy"}


class AdoptError(CassError, ValueError):
    """The shards cannot be described: no match, a sample without image or label, mixed formats."""


def _raise(exc: Exception) -> bool:
    raise AdoptError(f"unreadable tar member ({exc})") from exc


def _read_shard(path: Path, *, mode: str, num_classes: int, multi_label: bool):
    """Yield (key, label, image extension, uint8 CxHxW) for every sample of one tar; raise AdoptError."""
    with open(path, "rb") as stream:
        files = tariterators.tar_file_expander([{"url": str(path), "stream": stream}], handler=_raise)
        for sample in tariterators.group_by_keys(files, handler=_raise):
            key = sample["__key__"]
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                raise AdoptError(f"{path}: sample {key!r} has no image ({', '.join(IMAGE_EXTENSIONS)})")
            try:
                label = _parse_label(sample, num_classes, multi_label)
                image = decode_image(sample[ext], mode)
            except KeyError as exc:
                raise AdoptError(f"{path}: sample {key!r} has no label (<key>.cls or <key>.json)") from exc
            except Exception as exc:  # noqa: BLE001 - decoders raise many types
                raise AdoptError(f"{path}: sample {key!r}: {type(exc).__name__}: {exc}") from exc
            yield key, label, ext, image


def adopt_shards(shards_dir: str | os.PathLike, splits: dict[str, str], *, class_names: list[str],
                 task: str = "multi-class", mode: str = "RGB") -> Manifest:
    """Describe the tars of ``shards_dir`` matching each split's glob pattern; write indexes + manifest.

    Returns the saved Manifest (keys in tar order: the order the loader reads them in). Raises
    AdoptError for a pattern matching nothing, a sample without image or valid label, mixed image
    formats or repeated keys, ValueError for a bad task or mode.
    """
    root = Path(shards_dir)
    if task not in TASKS or mode not in ("RGB", "L"):
        raise ValueError(f"task must be one of {TASKS} and mode RGB or L, got {task!r}, {mode!r}")
    num, formats, sizes, infos = len(class_names), set(), set(), {}
    stats, pixels, train_labels = np.zeros((3 if mode == "RGB" else 1, 2)), 0, []
    for split, pattern in splits.items():
        paths = sorted(root.glob(pattern))
        if not paths:
            raise AdoptError(f"{root}: no shard matches {pattern!r} (split {split})")
        keys, labels, shards = [], [], []
        for path in paths:
            count = 0
            for key, label, ext, image in _read_shard(path, mode=mode, num_classes=num,
                                                      multi_label=task == "multi-label"):
                keys.append(key)
                labels.append(label)
                formats.add(FORMAT_OF[ext])
                sizes.add(tuple(image.shape[-2:]))
                count += 1
                if split == "train" or "train" not in splits:
                    unit = image.reshape(image.shape[0], -1).double() / 255
                    stats += np.stack([unit.sum(1).numpy(), (unit ** 2).sum(1).numpy()], axis=1)
                    pixels += unit.shape[1]
            shards.append(ShardInfo(name=str(path.relative_to(root)), count=count, bytes=path.stat().st_size,
                                    sha256=sha256_of(path)))
        if len(set(keys)) != len(keys):
            raise AdoptError(f"{root}: split {split} repeats keys; the loader needs each key once")
        index = f"index-{split}.json"
        write_json_atomic(root / index, {"keys": keys, "labels": labels})
        infos[split] = SplitInfo(count=len(keys), class_counts=class_counts(labels, num, task), shards=shards,
                                 index=index)
        if split == "train" or "train" not in splits:
            train_labels += labels
    if len(formats) != 1:
        raise AdoptError(f"{root}: the shards mix image formats {sorted(formats)}; the loader needs one")
    mean = stats[:, 0] / pixels
    std = np.sqrt(np.maximum(stats[:, 1] / pixels - mean ** 2, 0.0))
    image_info = ImageInfo(mode=mode, format=formats.pop(), size=list(sizes.pop()) if len(sizes) == 1 else None,
                           mean=[round(float(m), 6) for m in mean], std=[round(float(s), 6) for s in std])
    manifest = Manifest(task=task, class_names=list(class_names), image=image_info, splits=infos,
                        class_weights=class_weights(train_labels, num, task),
                        source={"type": "webdataset", "args": {"splits": dict(splits)}})
    manifest.validate(str(root / MANIFEST_NAME))
    manifest.save(root)
    return manifest


def parse_class_names(text: str) -> list[str]:
    """Class names from ``a,b,c`` or a JSON list (the CLI's --classes)."""
    text = text.strip()
    names = json.loads(text) if text.startswith("[") else [c.strip() for c in text.split(",") if c.strip()]
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"--classes: expected names like a,b,c, got {text!r}")
    return names

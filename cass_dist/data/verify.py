"""Re-read a shard set and check it against its manifest: sizes, sha256, counts, keys, labels, images."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext

from cass_dist.data.manifest import Manifest, ManifestError, load_manifest, sha256_of
from cass_dist.data.output import SHARD_PATTERN
from cass_dist.data.splits import class_counts


def verify_shards(shard_dir: str | os.PathLike, *, decode: bool = True) -> list[str]:
    """Check every shard of ``shard_dir`` against its manifest and return the problems found.

    An empty list means the set is complete and intact. Each problem names the file (and sample key)
    concerned. Checks: manifest valid; each shard present with the recorded size and sha256; each sample
    has exactly one image and one json with a valid label; counts, class counts and keys match the
    manifest and the split index; every image decodes (unless ``decode`` is false) to the recorded mode.
    Never raises for a damaged set; only for an unreadable directory (OSError).
    """
    root = Path(shard_dir)
    try:
        manifest = load_manifest(root)
    except ManifestError as exc:
        return [str(exc)]
    problems: list[str] = []
    listed = set()
    for split_name, split in manifest.splits.items():
        keys, labels = [], []
        for shard in split.shards:
            listed.add(shard.name)
            path = root / shard.name
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != shard.bytes:
                problems.append(f"{path}: {size} bytes, manifest says {shard.bytes}")
            if sha256_of(path) != shard.sha256:
                problems.append(f"{path}: sha256 differs from the manifest")
            found = _check_tar(path, manifest, decode, problems)
            if len(found) != shard.count:
                problems.append(f"{path}: {len(found)} samples, manifest says {shard.count}")
            keys += [k for k, _ in found]
            labels += [label for _, label in found]
        _check_split(root, split_name, split, keys, labels, manifest, problems)
    for path in sorted(root.iterdir()):
        if SHARD_PATTERN.match(path.name) and path.name not in listed:
            problems.append(f"{path}: shard not listed in the manifest")
    return problems


def _check_tar(path: Path, manifest: Manifest, decode: bool, problems: list[str]) -> list[tuple[str, object]]:
    """Return (key, label) of every well-formed sample, appending a problem for each bad one."""
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = base_plus_ext(info.name)  # webdataset's own rule for keys
                if key is not None:
                    members.setdefault(key, {})[ext.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"{path}: unreadable tar ({type(exc).__name__}: {exc})")
    image_ext = manifest.image.format
    adopted = manifest.source.get("type") == "webdataset"  # foreign shards: extra members, modes read as asked
    found = []
    for key, parts in members.items():
        where = f"{path}:{key}"
        images = [e for e in parts if e == image_ext or (image_ext == "jpg" and e == "jpeg")]
        labels = [e for e in ("json", "cls") if e in parts]
        if len(images) != 1 or not labels or (not adopted and set(parts) != {image_ext, "json"}):
            expected = f"one .{image_ext} image and a .json label" + (" (or .cls)" if adopted else "")
            problems.append(f"{where}: holds {sorted(parts)}, expected {expected}")
            continue
        try:
            label = json.loads(parts["json"])["label"] if "json" in parts else int(parts["cls"])
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{where}: bad label ({exc})")
            continue
        if not _label_ok(label, manifest):
            problems.append(f"{where}: label {label!r} is not valid for a {manifest.task} task "
                            f"with {manifest.num_classes} classes")
            continue
        if decode:
            try:
                mode = _decoded_mode(parts[images[0]], image_ext)
            except Exception as exc:  # decoders raise many types for bad data
                problems.append(f"{where}: image does not decode ({type(exc).__name__}: {exc})")
                continue
            if mode != manifest.image.mode and not adopted:
                problems.append(f"{where}: image mode {mode}, manifest says {manifest.image.mode}")
        found.append((key, label))
    return found


def _decoded_mode(data: bytes, image_ext: str) -> str:
    """Decode an image fully and return its mode ("RGB", "L", ...); raises for undecodable data."""
    if image_ext == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
            raise ValueError(f"raw image of dtype {array.dtype} and shape {array.shape} is not uint8 L or RGB")
        return "L" if array.ndim == 2 else "RGB"
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.mode


def _label_ok(label, manifest: Manifest) -> bool:
    if manifest.task == "multi-label":
        return (isinstance(label, list) and len(label) == manifest.num_classes
                and all(v in (0, 1) and not isinstance(v, bool) for v in label))
    return isinstance(label, int) and not isinstance(label, bool) and 0 <= label < manifest.num_classes


def _check_split(root: Path, name: str, split, keys: list, labels: list, manifest: Manifest,
                 problems: list[str]) -> None:
    if len(keys) != split.count:
        problems.append(f"split {name!r}: {len(keys)} valid samples in its shards, manifest says {split.count}")
    repeated = [k for k, n in Counter(keys).items() if n > 1]
    if repeated:
        problems.append(f"split {name!r}: keys repeated across shards: {repeated[:5]}")
    if len(labels) == split.count and class_counts(labels, manifest.num_classes, manifest.task) != split.class_counts:
        problems.append(f"split {name!r}: class counts in the shards differ from the manifest's")
    if not split.index:
        return
    index_path = root / split.index
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{index_path}: unreadable ({exc})")
        return
    if not isinstance(index, dict):
        problems.append(f"{index_path}: expected a JSON object with 'keys' and 'labels', got {type(index).__name__}")
        return
    if index.get("keys") != keys or index.get("labels") != labels:
        problems.append(f"{index_path}: keys/labels differ from the shards' (in shard order)")

"""The shard-set manifest: what a directory of shards holds, and the contract between writer and loader.

A shard directory looks like::

    <dir>/train-000000.tar ... <dir>/val-000000.tar ... <dir>/test-000000.tar ...
    <dir>/index-train.json   (keys and labels of every sample of the split, in shard order)
    <dir>/manifest.json      (written last, atomically: its presence means the set is complete)

Each tar sample (WebDataset layout, one ``__key__`` per sample) holds:

- ``<key>.png`` or ``<key>.jpg``: the image, 8-bit RGB or L;
- ``<key>.json``: ``{"label": int | [0/1, ...], "source": "<original relative path>"}``.

Keys are ``<split>-<7-digit index>`` (unique by construction, free of dots and spaces); the original
file name lives in ``source``. Labels are class ids for multi-class and binary tasks and 0/1 vectors
for multi-label tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cass_dist.errors import CassError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TASKS = ("multi-class", "multi-label", "binary")


class ManifestError(CassError, ValueError):
    """A manifest is missing, unreadable, of an unknown version, or inconsistent."""


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    count: int
    class_counts: list[int]
    shards: list[ShardInfo]
    index: str = ""  # file name of the split's key/label index, relative to the shard dir


@dataclass
class ImageInfo:
    mode: str  # "RGB" or "L"
    format: str  # "png" or "jpg"
    size: list[int] | None  # [height, width] when all images share one size, else None
    mean: list[float]  # per channel, on train, in [0, 1]
    std: list[float]


@dataclass
class Manifest:
    task: str
    class_names: list[str]
    image: ImageInfo
    splits: dict[str, SplitInfo]
    class_weights: list[float]  # inverse frequency on train, mean 1: rare classes weigh more
    source: dict = field(default_factory=dict)  # {"type": ..., "args": {...}}
    duplicates: dict = field(default_factory=dict)  # cross-split byte-identical images
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> SplitInfo:
        """Return the named split; raise ManifestError naming the splits that exist."""
        if name not in self.splits:
            raise ManifestError(f"split {name!r} is not in this shard set; it has {sorted(self.splits)}")
        return self.splits[name]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "manifest") -> Manifest:
        """Build a Manifest from its JSON form; raise ManifestError naming the bad field."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{origin}: format_version {version!r} is not supported by this cass-dist "
                f"(it reads version {FORMAT_VERSION}); re-create the shards with this version's cass-shards"
            )
        try:
            splits = {
                name: SplitInfo(
                    count=s["count"],
                    class_counts=list(s["class_counts"]),
                    shards=[ShardInfo(**sh) for sh in s["shards"]],
                    index=s.get("index", ""),
                )
                for name, s in data["splits"].items()
            }
            manifest = cls(
                task=data["task"],
                class_names=list(data["class_names"]),
                image=ImageInfo(**data["image"]),
                splits=splits,
                class_weights=list(data["class_weights"]),
                source=dict(data.get("source", {})),
                duplicates=dict(data.get("duplicates", {})),
                format_version=version,
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{origin}: missing or malformed field: {exc}") from exc
        manifest.validate(origin)
        return manifest

    def validate(self, origin: str = "manifest") -> None:
        """Raise ManifestError if the manifest contradicts itself."""
        if self.task not in TASKS:
            raise ManifestError(f"{origin}: task {self.task!r} is not one of {TASKS}")
        if not self.class_names:
            raise ManifestError(f"{origin}: class_names is empty")
        if self.image.mode not in ("RGB", "L"):
            raise ManifestError(f"{origin}: image.mode {self.image.mode!r} is not 'RGB' or 'L'")
        channels = 3 if self.image.mode == "RGB" else 1
        if len(self.image.mean) != channels or len(self.image.std) != channels:
            raise ManifestError(f"{origin}: image.mean/std need {channels} values for mode {self.image.mode}")
        for name, split in self.splits.items():
            if sum(sh.count for sh in split.shards) != split.count:
                raise ManifestError(f"{origin}: split {name!r}: shard counts do not add up to {split.count}")
            if len(split.class_counts) != self.num_classes:
                raise ManifestError(f"{origin}: split {name!r}: class_counts has {len(split.class_counts)} "
                                    f"entries, expected {self.num_classes}")

    def digest(self) -> str:
        """sha256 of the canonical JSON form: identifies the exact dataset a model was trained on."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def save(self, shard_dir: str | os.PathLike) -> Path:
        """Write ``manifest.json`` atomically (temp name, then rename) and return its path."""
        path = Path(shard_dir) / MANIFEST_NAME
        write_json_atomic(path, self.to_dict())
        return path


def load_manifest(shard_dir: str | os.PathLike) -> Manifest:
    """Load ``<shard_dir>/manifest.json``; raise ManifestError when it is absent or invalid."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: {shard_dir} is not a complete shard set "
            f"(create one with `cass-shards ... --out {shard_dir}`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_dict(data, origin=str(path))


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to a temporary sibling, fsync it, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

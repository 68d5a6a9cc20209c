"""The shard-set manifest: what a directory of shards holds, and the contract between writer and loader.

A shard directory looks like::

    <dir>/train-000000.tar ... <dir>/val-000000.tar ... <dir>/test-000000.tar ...
    <dir>/index-train.json   (keys and labels of every sample of the split, in shard order)
    <dir>/manifest.json      (written last, atomically: its presence means the set is complete)

Each tar sample (WebDataset layout, one ``__key__`` per sample) holds:

- ``<key>.png``, ``<key>.jpg`` or ``<key>.npy`` (raw uint8 HxW or HxWx3, ``--format raw``): the image,
  8-bit RGB or L;
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

FORMAT_VERSION = 2  # 2: raw ".npy" images (image.format "npy"); sets of version 1 read unchanged
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
TASKS = ("multi-class", "multi-label", "binary")
IMAGE_FORMATS = ("png", "jpg", "npy")


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
    format: str  # "png", "jpg" or "npy" (raw uint8 arrays)
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
        if not isinstance(data, dict):
            raise ManifestError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ManifestError(
                f"{origin}: format_version {version!r} is not supported by this cass-dist "
                f"(it reads versions {list(READABLE_VERSIONS)}); re-create the shards with this version's cass-shards"
            )
        try:
            splits = {str(name): _split(s, f"splits.{name}") for name, s in _typed(data["splits"], dict, "splits").items()}
            image = _typed(data["image"], dict, "image")
            manifest = cls(
                task=_typed(data["task"], str, "task"),
                class_names=[_typed(c, str, "class_names[]") for c in _typed(data["class_names"], list, "class_names")],
                image=ImageInfo(**image),
                splits=splits,
                class_weights=[float(w) for w in _typed(data["class_weights"], list, "class_weights")],
                source=dict(_typed(data.get("source", {}), dict, "source")),
                duplicates=dict(_typed(data.get("duplicates", {}), dict, "duplicates")),
                format_version=version,
            )
            _check_image(manifest.image)
        except _FieldTypeError as exc:
            raise ManifestError(f"{origin}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_dict(data, origin=str(path))


class _FieldTypeError(CassError, ValueError):
    """A manifest field of the wrong type; ``Manifest.from_dict`` re-raises it as a ManifestError."""


def _typed(value, kind: type, field_name: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _FieldTypeError(f"{field_name} must be {_NAMES[kind]}, got {value!r:.60}")
    return value


_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _split(data, field_name: str) -> SplitInfo:
    _typed(data, dict, field_name)
    shards = _typed(data["shards"], list, f"{field_name}.shards")
    return SplitInfo(count=_typed(data["count"], int, f"{field_name}.count"),
                     class_counts=list(_typed(data["class_counts"], list, f"{field_name}.class_counts")),
                     shards=[_shard(sh, f"{field_name}.shards[{i}]") for i, sh in enumerate(shards)],
                     index=_typed(data.get("index", ""), str, f"{field_name}.index"))


def _shard(data, field_name: str) -> ShardInfo:
    _typed(data, dict, field_name)
    name = _typed(data["name"], str, f"{field_name}.name")
    if not name or name.startswith("/") or ".." in Path(name).parts:
        raise _FieldTypeError(f"{field_name}.name must be a path inside the shard directory, got {name!r}")
    return ShardInfo(name=name, count=_typed(data["count"], int, f"{field_name}.count"),
                     bytes=_typed(data["bytes"], int, f"{field_name}.bytes"),
                     sha256=_typed(data["sha256"], str, f"{field_name}.sha256"))


def _check_image(image: ImageInfo) -> None:
    if image.format not in IMAGE_FORMATS:
        raise _FieldTypeError(f"image.format must be one of {list(IMAGE_FORMATS)}, got {image.format!r}")
    if image.size is not None and (not isinstance(image.size, list) or len(image.size) != 2
                                   or not all(isinstance(v, int) and v > 0 for v in image.size)):
        raise _FieldTypeError(f"image.size must be [height, width] or null, got {image.size!r}")
    for name in ("mean", "std"):
        values = getattr(image, name)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise _FieldTypeError(f"image.{name} must be a list of numbers, got {values!r}")


def sha256_of(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to a temporary sibling, fsync it, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

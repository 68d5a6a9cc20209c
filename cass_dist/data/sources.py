"""Readers that turn a dataset on disk into Sample records: MedMNIST npz, class folders, a CSV of paths.

Readers check everything they can without decoding pixels (columns, labels, missing files, empty
folders, npz keys) and raise SourceError naming the file or field, so that bad input fails before any
shard is written.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cass_dist.data.images import IMAGE_SUFFIXES
from cass_dist.errors import CassError

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
MEDMNIST_SIZES = (28, 64, 128, 224)
MEDMNIST_TASKS = {"multi-label, binary-class": "multi-label", "binary-class": "binary",
                  "multi-class": "multi-class", "ordinal-regression": "multi-class"}


class SourceError(CassError, ValueError):
    """The input dataset is malformed; the message names the file or field and what was expected."""


@dataclass
class Sample:
    """One input image and its label, before conversion."""

    source: str  # where it came from, relative to the dataset root (stored in the shard's json)
    label: int | list[int]  # class id, or 0/1 list for multi-label
    split: str | None = None  # the curator's split, when the dataset has one
    group: str | None = None  # patient / slide: samples of one group never span two splits
    path: Path | None = None  # file to read ...
    array: np.ndarray | None = None  # ... or the pixels themselves (npz, synthetic)


@dataclass
class SourceData:
    """A whole dataset as read from disk."""

    samples: list[Sample]
    class_names: list[str]
    task: str  # "multi-class", "multi-label" or "binary"
    kind: str  # "medmnist", "folder", "csv", "synthetic"
    args: dict = field(default_factory=dict)  # how it was read, recorded in the manifest


def _first(items: list, n: int = 5) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return f"{shown}{', ...' if len(items) > n else ''} ({len(items)} in all)"


# --- MedMNIST -------------------------------------------------------------------------------------

def medmnist_file_name(flag: str, size: int) -> str:
    """Return the npz name the medmnist package uses: ``<flag>.npz`` at 28 px, ``<flag>_<size>.npz`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _download_medmnist(flag: str, size: int, root: Path) -> None:
    """Let the medmnist package download (and md5-check) its npz into ``root``."""
    import medmnist

    cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
    root.mkdir(parents=True, exist_ok=True)
    cls(split="train", download=True, size=size, root=str(root))


def read_medmnist(flag: str, *, size: int = 28, root: str | Path | None = None) -> SourceData:
    """Read a 2D MedMNIST dataset from its official npz, keeping the official train/val/test splits.

    With ``root`` the npz is read from there (offline); without, the medmnist package downloads it into
    ``~/.medmnist``. Returns a SourceData with class names and task from ``medmnist.INFO``.
    Raises SourceError for an unknown flag or size, a missing file or failed download, missing npz keys,
    bad array shapes or labels outside the dataset's classes.
    """
    from medmnist import INFO

    if flag not in INFO:
        flags = sorted(k for k in INFO if not k.endswith("3d"))
        raise SourceError(f"medmnist: unknown dataset {flag!r}; known 2D flags: {', '.join(flags)}")
    if size not in MEDMNIST_SIZES:
        raise SourceError(f"medmnist: size must be one of {MEDMNIST_SIZES}, got {size!r}")
    info = INFO[flag]
    if info["task"] not in MEDMNIST_TASKS:
        raise SourceError(f"medmnist: task {info['task']!r} of {flag} is not supported")
    task = MEDMNIST_TASKS[info["task"]]
    class_names = [info["label"][k] for k in sorted(info["label"], key=int)]
    name = medmnist_file_name(flag, size)
    path = Path(root if root is not None else Path.home() / ".medmnist") / name
    if root is None and not path.is_file():
        try:
            _download_medmnist(flag, size, path.parent)
        except Exception as exc:
            reason = " ".join(str(exc).split())  # medmnist's message spans lines; keep ours on one
            raise SourceError(f"medmnist: could not download {name} ({type(exc).__name__}: {reason}); "
                              f"offline, pass --root DIR with a directory holding {name}") from exc
    if not path.is_file():
        raise SourceError(f"medmnist: {path} not found (expected the official file {name})")
    try:
        npz = np.load(path)
    except Exception as exc:
        raise SourceError(f"medmnist: {path} is not a readable npz ({exc})") from exc
    with npz:
        expected = [f"{s}_{kind}" for s in ("train", "val", "test") for kind in ("images", "labels")]
        missing = [k for k in expected if k not in npz.files]
        if missing:
            raise SourceError(f"medmnist: {path} lacks keys {missing}; it has {sorted(npz.files)} "
                              f"(expected {expected})")
        samples = []
        for split in ("train", "val", "test"):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            samples.extend(_medmnist_split(path, split, images, labels, task, len(class_names)))
    return SourceData(samples, class_names, task, "medmnist",
                      {"flag": flag, "size": size, "file": str(path), "medmnist_task": info["task"]})


def _medmnist_split(path: Path, split: str, images: np.ndarray, labels: np.ndarray, task: str,
                    num_classes: int) -> list[Sample]:
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise SourceError(f"medmnist: {path}: {split}_images has shape {images.shape}, "
                          f"expected (N,H,W) or (N,H,W,3)")
    if images.dtype != np.uint8:
        raise SourceError(f"medmnist: {path}: {split}_images has dtype {images.dtype}, expected uint8")
    labels = labels.reshape(len(labels), -1)
    if len(labels) != len(images):
        raise SourceError(f"medmnist: {path}: {split}_labels has {len(labels)} rows but "
                          f"{split}_images has {len(images)}")
    width = num_classes if task == "multi-label" else 1
    if labels.shape[1] != width:
        raise SourceError(f"medmnist: {path}: {split}_labels has {labels.shape[1]} columns, expected {width}")
    bad = labels < 0
    bad |= labels > 1 if task == "multi-label" else labels >= num_classes
    if bad.any():
        rows = np.flatnonzero(bad.any(1)).tolist()
        raise SourceError(f"medmnist: {path}: {split}_labels has values outside "
                          f"{'0/1' if task == 'multi-label' else f'0..{num_classes - 1}'} at rows {_first(rows)}")
    out = []
    for i in range(len(images)):
        label = labels[i].astype(int).tolist() if task == "multi-label" else int(labels[i, 0])
        out.append(Sample(f"{path.name}:{split}/{i}", label, split=split, array=images[i]))
    return out


# --- class folders --------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_folder(root: str | Path) -> SourceData:
    """Read ``root/<class>/*`` or ``root/<split>/<class>/*`` (split folders: train/val/test, Training/Testing).

    Curator splits are kept (Testing -> test, Training -> train, and so on). Classes are the sorted
    union of class folder names. Returns a multi-class SourceData (binary when there are two classes).
    Raises SourceError when root is missing, has no class folders, or a class folder holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"folder: {root} is not a directory")
    top = _subdirs(root)
    split_dirs = {d: SPLIT_ALIASES[d.name.lower()] for d in top if d.name.lower() in SPLIT_ALIASES}
    if split_dirs and len(split_dirs) != len(top):
        others = [d.name for d in top if d not in split_dirs]
        raise SourceError(f"folder: {root} mixes split folders {[d.name for d in split_dirs]} with other "
                          f"folders {others}; expected only split folders or only class folders")
    layout = [(d, s) for d, s in split_dirs.items()] if split_dirs else [(root, None)]
    if len({s for _, s in layout}) != len(layout):
        raise SourceError(f"folder: {root} has two folders for one split: {[d.name for d, _ in layout]}")
    class_dirs = {(base, split): _subdirs(base) for base, split in layout}
    class_names = sorted({d.name for dirs in class_dirs.values() for d in dirs})
    if not class_names:
        raise SourceError(f"folder: {root} has no class subfolders (expected {root}/<class>/<image>)")
    index = {name: i for i, name in enumerate(class_names)}
    samples, empty = [], []
    for (_, split), dirs in class_dirs.items():
        for d in dirs:
            files = _image_files(d)
            if not files:
                empty.append(str(d))
            samples.extend(Sample(p.relative_to(root).as_posix(), index[d.name], split=split, path=p)
                           for p in files)
    if empty:
        raise SourceError(f"folder: class folders without any image ({', '.join(IMAGE_SUFFIXES)}): "
                          f"{_first(empty)}")
    task = "binary" if len(class_names) == 2 else "multi-class"
    return SourceData(samples, class_names, task, "folder", {"root": str(root)})


# --- CSV ------------------------------------------------------------------------------------------

def read_csv(path: str | Path, *, image_col: str, label_col: str | None = None,
             label_cols: list[str] | None = None, group_col: str | None = None,
             split_col: str | None = None, root: str | Path | None = None,
             classes: list[str] | None = None) -> SourceData:
    """Read a CSV of image paths and labels.

    Multi-class: ``label_col`` holds class names or ids (``classes`` fixes the allowed names and their
    order; otherwise the sorted distinct values). Multi-label: ``label_cols`` are 0/1 columns. Image
    paths are relative to ``root`` (default: the CSV's directory). ``split_col`` keeps the curator's
    split; ``group_col`` keeps each group inside one split.
    Raises SourceError for a missing CSV or column, empty or unknown labels, non-0/1 multi-label values,
    unknown split names, or image files that do not exist (listing the first few and the count).
    """
    path = Path(path)
    if (label_col is None) == (label_cols is None):
        raise SourceError("csv: give exactly one of label_col (multi-class) or label_cols (multi-label)")
    if not path.is_file():
        raise SourceError(f"csv: {path} not found")
    root = Path(root) if root is not None else path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = list(reader)
    wanted = [image_col, *([label_col] if label_col else label_cols), group_col, split_col]
    missing = [c for c in wanted if c is not None and c not in header]
    if missing:
        raise SourceError(f"csv: {path} has no column(s) {missing}; its columns are {header}")
    if not rows:
        raise SourceError(f"csv: {path} has no data rows")
    if label_cols is not None:
        class_names, labels, task = list(label_cols), _multi_labels(path, rows, label_cols), "multi-label"
    else:
        class_names, labels = _class_labels(path, rows, label_col, classes)
        task = "binary" if len(class_names) == 2 else "multi-class"
    splits = _split_values(path, rows, split_col) if split_col else [None] * len(rows)
    samples, absent = [], []
    for row, label, split in zip(rows, labels, splits):
        rel = row[image_col].strip()
        file = Path(rel) if Path(rel).is_absolute() else root / rel
        if not rel or not file.is_file():
            absent.append(rel or "<empty>")
        group = row[group_col].strip() if group_col else None
        samples.append(Sample(rel, label, split=split, group=group, path=file))
    if absent:
        raise SourceError(f"csv: {path}: image files not found under {root}: {_first(absent)}")
    args = {"csv": str(path), "root": str(root), "image_col": image_col, "label_col": label_col,
            "label_cols": label_cols, "group_col": group_col, "split_col": split_col}
    return SourceData(samples, class_names, task, "csv", args)


def _class_labels(path: Path, rows: list[dict], column: str, classes: list[str] | None):
    values = [row[column].strip() for row in rows]
    empty = [i + 2 for i, v in enumerate(values) if not v]  # +2: header line, 1-based lines
    if empty:
        raise SourceError(f"csv: {path}: column {column!r} is empty on lines {_first(empty)}")
    if classes is None:
        distinct = set(values)
        numeric = all(v.lstrip("-").isdigit() for v in distinct)
        classes = sorted(distinct, key=int) if numeric else sorted(distinct)
        if numeric and [int(v) for v in classes] != list(range(len(classes))):
            raise SourceError(f"csv: {path}: column {column!r} holds numeric labels {classes}, expected class "
                              f"ids 0..{len(classes) - 1} (or pass class names)")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise SourceError(f"csv: {path}: column {column!r} has unknown label values {_first(unknown)}; "
                          f"expected one of {classes}")
    return list(classes), [index[v] for v in values]


def _multi_labels(path: Path, rows: list[dict], columns: list[str]) -> list[list[int]]:
    labels = []
    for line, row in enumerate(rows, start=2):
        vector = []
        for col in columns:
            value = row[col].strip()
            if value not in ("0", "1", "0.0", "1.0"):
                raise SourceError(f"csv: {path}: multi-label column {col!r} must hold 0 or 1, "
                                  f"found {value!r} on line {line}")
            vector.append(int(float(value)))
        labels.append(vector)
    return labels


def _split_values(path: Path, rows: list[dict], column: str) -> list[str]:
    values = [row[column].strip().lower() for row in rows]
    unknown = sorted({v for v in values if v not in SPLIT_ALIASES})
    if unknown:
        raise SourceError(f"csv: {path}: column {column!r} has unknown split names {_first(unknown)}; "
                          f"expected train/val/test (or training/validation/testing)")
    return [SPLIT_ALIASES[v] for v in values]

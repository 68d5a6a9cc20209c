"""Sample records -> WebDataset tar shards, split indexes and manifest.json (written last).

The new set is built beside the output, in ``.<out>.new-<pid>`` (tars written by webdataset's
``TarWriter`` with fixed owner, mode and mtime, so the same input gives the same bytes), and
swapped in once complete: on Linux with one atomic ``renameat2(RENAME_EXCHANGE)``, elsewhere with two
renames (``<out>`` -> ``.<out>.old-<pid>``, the new set -> ``<out>``). A kill at any moment leaves the
old set or the new one complete: at ``<out>``, or, between the two fallback renames, beside it, where
the next run (any ``cass-shards`` command that writes) moves it in. Every later run removes what an
interrupted one left (``recover_output``). Files in ``<out>`` that are not part of a shard set
(notes, READMEs) move over to the new set.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from webdataset import TarWriter

from cass_dist.data import images
from cass_dist.data.images import ImageOptions
from cass_dist.data.manifest import (
    MANIFEST_NAME,
    ImageInfo,
    Manifest,
    ShardInfo,
    SplitInfo,
    sha256_of,
    write_json_atomic,
)
from cass_dist.data.output import OutputExistsError, prepare_output, recover_output, swap_in  # noqa: F401 (re-export)
from cass_dist.data.sources import Sample, SourceData, SourceError
from cass_dist.data.splits import (
    SPLIT_ORDER,
    assign_splits,
    class_counts,
    class_weights,
    cross_split_duplicates,
    shuffled_members,
)

STAGES = ("shards", "manifest", "old-moved", "swapped", "done")  # where ``on_stage`` is called
CHUNK = 32  # images per pool task: big enough to amortise IPC, small enough for a smooth progress bar


@dataclass
class WriteOptions:
    """How a dataset is turned into shards."""

    image: ImageOptions = field(default_factory=ImageOptions)
    shard_size: int = 1000  # samples per tar
    seed: int = 0  # split assignment and in-split shuffling
    workers: int | None = None  # processes; None = every core, 0 or 1 = in this process
    overwrite: bool = False
    dedupe: bool = False  # drop val/test images byte-identical to an image of an earlier split
    val_fraction: float = 0.1  # share of train carved out as val when the curator gave train/test only
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        self.image.validate()
        if int(self.shard_size) < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size!r}")
        if self.workers is not None and int(self.workers) < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")


def write_shards(data: SourceData, out_dir: str | os.PathLike, options: WriteOptions | None = None, *,
                 on_stage: Callable[[str], None] | None = None) -> Manifest:
    """Convert ``data`` into ``<out_dir>/<split>-NNNNNN.tar`` shards, indexes and a manifest.

    Returns the saved Manifest. Raises OutputExistsError when out_dir already holds a finished set and
    ``options.overwrite`` is false, SourceError for an empty dataset, ImageError naming the first
    unreadable image (before any shard is written), ValueError for bad options. On any error (or
    interrupt) the files of this run are removed and ``out_dir`` is left as it was. ``on_stage(name)``
    is called at each of ``STAGES`` (a test hook: the tests kill the writer there).
    """
    options = options or WriteOptions()
    options.validate()
    if not data.samples:
        raise SourceError(f"{data.kind}: the dataset has no samples")
    out = Path(out_dir)
    stage = on_stage or (lambda name: None)
    prepare_output(out, options.overwrite)
    samples = list(data.samples)
    workers = _num_workers(options.workers, len(samples))
    staging = out.parent / f".{out.name}.new-{os.getpid()}"
    swapping = False
    try:
        with _pool(workers) as pool:
            digests = _digests(samples, pool)  # also probes every file header: bad files fail here
            groups = [x.group for x in samples] if any(x.group is not None for x in samples) else None
            if groups is None and len(set(digests)) < len(digests):
                groups = digests  # splits made here keep byte-identical images together
            splits = assign_splits([x.split for x in samples], [x.label for x in samples], groups,
                                   seed=options.seed, val_fraction=options.val_fraction)
            dupes = cross_split_duplicates(digests, splits)
            dropped = set(dupes.drop) if options.dedupe else set()
            if not options.dedupe:
                dupes.dropped = 0
            by_split = {s: [i for i in shuffled_members(splits, s, options.seed) if i not in dropped]
                        for s in SPLIT_ORDER if s in splits}
            staging.mkdir()
            results = _write_all(data, samples, by_split, staging, options, pool)
        stage("shards")
        manifest = _finish(data, results, staging, options, dupes)
        stage("manifest")
        swapping = True
        swap_in(staging, out, stage)
    except BaseException:
        if swapping:
            recover_output(out)  # the new set is complete: finish the swap (or keep the old set)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _num_workers(workers: int | None, n: int) -> int:
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if n < 4 * CHUNK else min(int(workers), max(1, n // CHUNK))


class _InProcess:
    """A stand-in for a process pool that maps in this process (workers=0/1, tiny datasets)."""

    def imap(self, fn, items):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    # Default start method (fork on Linux: no re-import cost). Task functions are module-level and
    # their arguments picklable, so spawn/forkserver platforms work too.
    return multiprocessing.get_context().Pool(workers, _ignore_sigint) if workers > 1 else _InProcess()


def _ignore_sigint() -> None:
    # Ctrl-C is handled once, in the parent (which cleans up and terminates the pool), not per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunks(items: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _payload(sample: Sample):
    return (sample.array, sample.source) if sample.array is not None else (str(sample.path), sample.source)


def _array_digest(array: np.ndarray) -> str:
    head = f"{array.dtype}{array.shape}".encode()
    return hashlib.sha256(head + np.ascontiguousarray(array).tobytes()).hexdigest()


def _file_digests(paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise images.ImageError(f"{path}: cannot read ({exc})") from exc
        images.probe(raw, path)
        out.append(hashlib.sha256(raw).hexdigest())
    return out


def _convert_task(task: tuple[list, ImageOptions]) -> list[tuple[bytes, tuple[int, int], np.ndarray]]:
    chunk, options = task
    out = []
    for data, name in chunk:
        if isinstance(data, str):
            raw, name = Path(data).read_bytes(), data
            out.append(images.convert(raw, options, name))
        else:
            out.append(images.convert(data, options, name))
    return out


def _digests(samples: list[Sample], pool) -> list[str]:
    # Arrays are hashed here (sending them to workers costs more than hashing); files in the pool.
    paths = [str(s.path) for s in samples if s.array is None]
    from_files = iter([d for chunk in pool.imap(_file_digests, list(_chunks(paths))) for d in chunk])
    return [_array_digest(s.array) if s.array is not None else next(from_files) for s in samples]


def _write_all(data: SourceData, samples: list[Sample], by_split: dict[str, list[int]], out: Path,
               options: WriteOptions, pool) -> dict:
    total = sum(len(v) for v in by_split.values())
    results = {}
    with tqdm(total=total, desc=f"cass-shards {data.kind}", unit="img", disable=not options.progress) as bar:
        for split, order in by_split.items():
            tasks = [([_payload(samples[i]) for i in chunk], options.image) for chunk in _chunks(order)]
            converted = (r for chunk in pool.imap(_convert_task, tasks) for r in chunk)
            results[split] = _write_split(split, order, samples, converted, out, options, bar)
    return results


def _write_split(split, order, samples, converted, out: Path, options: WriteOptions, bar) -> dict:
    shards, keys, labels, sizes = [], [], [], set()
    stats, pixels = None, 0
    writer, fh, count = None, None, 0
    ext = options.image.format
    for pos, (i, (encoded, hw, image_stats)) in enumerate(zip(order, converted)):
        if writer is None:
            path = out / f"{split}-{len(shards):06d}.tar"
            fh = open(path, "wb")
            # WebDataset layout; fixed owner, mode and mtime 0 so that the same input gives the same bytes.
            writer = TarWriter(fh, encoder=False, mtime=0, user="bigdata", group="bigdata", mode=0o444)
        key = f"{split}-{pos:07d}"
        meta = {"label": samples[i].label, "source": samples[i].source}
        writer.write({"__key__": key, ext: encoded, "json": json.dumps(meta).encode()})
        keys.append(key)
        labels.append(samples[i].label)
        sizes.add(tuple(hw))
        pixels += hw[0] * hw[1]
        stats = image_stats if stats is None else stats + image_stats
        count += 1
        bar.update(1)
        if count == options.shard_size or pos == len(order) - 1:
            shards.append(_close(writer, fh, path, count))
            writer, count = None, 0
    return {"shards": shards, "keys": keys, "labels": labels, "sizes": sizes, "stats": stats, "pixels": pixels}


def _close(writer: TarWriter, fh, path: Path, count: int) -> ShardInfo:
    writer.close()  # writes the end-of-archive blocks; the file object stays ours
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    return ShardInfo(name=path.name, count=count, bytes=path.stat().st_size, sha256=sha256_of(path))


def _finish(data: SourceData, results: dict, out: Path, options: WriteOptions, dupes) -> Manifest:
    num = len(data.class_names)
    results = {s: r for s, r in results.items() if r["keys"]}  # a split emptied by dedupe is left out
    splits = {}
    for split, res in results.items():
        index = f"index-{split}.json"
        write_json_atomic(out / index, {"keys": res["keys"], "labels": res["labels"]})
        splits[split] = SplitInfo(count=len(res["keys"]), class_counts=class_counts(res["labels"], num, data.task),
                                  shards=res["shards"], index=index)
    # Statistics come from train; a dataset without train (a test-only CSV) uses all of its samples.
    basis = [results["train"]] if "train" in results else list(results.values())
    stats = sum(r["stats"] for r in basis)
    pixels = sum(r["pixels"] for r in basis)
    mean = stats[:, 0] / pixels
    std = np.sqrt(np.maximum(stats[:, 1] / pixels - mean**2, 0.0))
    sizes = set().union(*(r["sizes"] for r in results.values()))
    image = ImageInfo(mode=options.image.mode, format=options.image.format,
                      size=list(next(iter(sizes))) if len(sizes) == 1 else None,
                      mean=[round(float(m), 6) for m in mean], std=[round(float(s), 6) for s in std])
    train_labels = [label for r in basis for label in r["labels"]]
    recorded = {**asdict(options.image), "shard_size": options.shard_size, "seed": options.seed,
                "dedupe": options.dedupe, "val_fraction": options.val_fraction}
    manifest = Manifest(task=data.task, class_names=list(data.class_names), image=image, splits=splits,
                        class_weights=class_weights(train_labels, num, data.task),
                        source={"type": data.kind, "args": {**data.args, **recorded}},
                        duplicates=dupes.to_dict())
    manifest.validate(str(out / MANIFEST_NAME))
    manifest.save(out)
    return manifest


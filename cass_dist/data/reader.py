"""The worker side of the loader: tar bytes -> raw samples -> shuffle buffer -> decode -> uint8 batches.

Each DataLoader worker (or the main process when num_workers=0) runs ``ShardStream.__iter__`` on its
own task list from the plan. The order of the stages is what makes the loader fast and resumable:
the shuffle buffer holds undecoded bytes (cheap to hold, cheap to drop), samples skipped on resume
are dropped before decoding, and only what reaches a batch is decoded and augmented.

Corrupted data never stops the stream: an unreadable tar tail, a missing or bad label json and an
undecodable image each count as one skipped sample (per wanted key), reported with the next batch.
"""

from __future__ import annotations

import json
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from cass_dist.data.sharding import ShardTask
from cass_dist.data.transforms import decode_image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")


@dataclass
class RawSample:
    key: str
    image: bytes
    label: object


class SkipCounter:
    """Corrupted samples seen by one worker since the last batch it emitted."""

    def __init__(self) -> None:
        self.pending = 0

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


def _tar_groups(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample of a tar read as a stream; raises on a damaged tar."""
    current, files = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if key != current and files:  # hand over a finished sample before reading on (may fail)
                yield current, files
                files = {}
            current = key
            files[ext.lower()] = tar.extractfile(member).read()
    if files:
        yield current, files


def _parse_label(files: dict[str, bytes], num_classes: int, multi_label: bool) -> object:
    """Return the sample's label from its json; raise ValueError when absent or out of range."""
    meta = json.loads(files["json"])
    label = meta["label"]
    if multi_label:
        if not isinstance(label, list) or len(label) != num_classes or any(v not in (0, 1) for v in label):
            raise ValueError(f"expected a 0/1 list of {num_classes}, got {label!r}")
    elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
        raise ValueError(f"expected a class id in [0, {num_classes}), got {label!r}")
    return label


def read_raw(tasks: list[ShardTask], counter: SkipCounter, num_classes: int,
             multi_label: bool) -> Iterator[RawSample]:
    """Yield the wanted samples of each task, undecoded; count every wanted key that is not yielded."""
    for task in tasks:
        wanted, seen = set(task.keys), set()
        try:
            for key, files in _tar_groups(task.path):
                if key not in wanted or key in seen:
                    continue
                seen.add(key)
                image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
                try:
                    label = _parse_label(files, num_classes, multi_label)
                except (KeyError, ValueError, TypeError):
                    label = None
                if image is None or label is None:
                    counter.pending += 1
                    continue
                yield RawSample(key, image, label)
        except (tarfile.TarError, OSError, EOFError):
            pass  # truncated or damaged tar: its unread keys are counted below
        counter.pending += len(wanted) - len(seen)


def shuffle_buffer(samples: Iterator[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """Yield samples in a locally shuffled order using a reservoir of ``size`` undecoded samples."""
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Iterable of uint8 worker batches ``{"image", "label", "key", "skipped"}`` for one rank.

    ``worker_tasks[w]`` is what worker slot w reads. In training each slot cycles over its tasks
    forever (the main process stops after the epoch's batches), so a slot never runs dry however the
    data is split or damaged; ``skip_batches[w]`` raw batches are dropped before decoding (resume),
    and DataLoader worker i plays slot ``(i + slot_offset) % workers`` so a resumed loader polls the
    slots in the same round-robin order as the uninterrupted one.
    """

    def __init__(self, worker_tasks: list[list[ShardTask]], *, train: bool, batch_size: int,
                 transform: Callable[[torch.Tensor], torch.Tensor], mode: str, size_hint: list[int] | None,
                 num_classes: int, multi_label: bool, seed: int, epoch: int, rank: int,
                 buffer_size: int, skip_batches: list[int] | None = None, slot_offset: int = 0):
        super().__init__()
        self.worker_tasks = worker_tasks
        self.train = train
        self.batch_size = batch_size
        self.transform = transform
        self.mode = mode
        self.size_hint = size_hint
        self.num_classes = num_classes
        self.multi_label = multi_label
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.buffer_size = buffer_size
        self.skip_batches = skip_batches or [0] * len(worker_tasks)
        self.slot_offset = slot_offset

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = ((info.id if info else 0) + self.slot_offset) % len(self.worker_tasks)
        counter = SkipCounter()
        raw = self._raw_stream(slot, counter)
        skip = self.skip_batches[slot] * self.batch_size
        for _ in range(skip):  # resume: drop already-consumed samples before decoding them
            if next(raw, None) is None:
                break
        # Augmentations draw from a generator seeded by the sample's position in this slot's stream,
        # so a resumed run (any worker count) augments each sample exactly as the straight run did,
        # and the caller's global RNG is never touched.
        aug_seed = zlib.crc32(f"{self.seed}/{self.epoch}/{self.rank}/{slot}".encode()) << 31
        yield from self._batches(raw, counter, aug_seed, first_position=skip)

    def _raw_stream(self, slot: int, counter: SkipCounter) -> Iterator[RawSample]:
        tasks = self.worker_tasks[slot]
        if not self.train:
            yield from read_raw(tasks, counter, self.num_classes, self.multi_label)
            return
        if not tasks:
            return
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{slot}")
        order = list(tasks)
        while True:
            # One buffer per pass over the worker's range, flushed at its end: the first pass (all an
            # epoch normally needs) yields each sample exactly once; later passes only cover shortfalls.
            produced = False
            for sample in shuffle_buffer(read_raw(order, counter, self.num_classes, self.multi_label),
                                         self.buffer_size, rng):
                produced = True
                yield sample
            if not produced:
                raise RuntimeError(f"no readable sample in {[t.path for t in tasks]}: every wanted sample "
                                   f"of this worker's shards is corrupted or missing")
            rng.shuffle(order)

    def _batches(self, raw: Iterator[RawSample], counter: SkipCounter, aug_seed: int,
                 first_position: int) -> Iterator[dict]:
        keys, images, labels = [], [], []
        for position, sample in enumerate(raw, start=first_position):
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(aug_seed + position)
                    image = self.transform(decode_image(sample.image, self.mode, self.size_hint))
            except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes; each is one skip
                counter.pending += 1
                continue
            keys.append(sample.key)
            images.append(image)
            labels.append(sample.label)
            if len(keys) == self.batch_size:
                yield self._collate(keys, images, labels, counter.take())
                keys, images, labels = [], [], []
        if keys or counter.pending:
            yield self._collate(keys, images, labels, counter.take())

    def _collate(self, keys: list[str], images: list[torch.Tensor], labels: list, skipped: int) -> dict:
        dtype = torch.float32 if self.multi_label else torch.int64
        return {
            "image": torch.stack(images) if images else torch.empty(0, dtype=torch.uint8),
            "label": torch.tensor(labels, dtype=dtype),
            "key": keys,
            "skipped": skipped,
        }

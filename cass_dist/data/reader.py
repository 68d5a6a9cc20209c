"""The worker side of the loader: tar bytes -> raw samples -> shuffle buffer -> decode -> uint8 batches.

Each DataLoader worker (or the main process when num_workers=0) runs ``ShardStream.__iter__``. The
order of the stages is what makes the loader fast and resumable: the shuffle buffer holds undecoded
bytes (cheap to hold, cheap to drop), samples skipped on resume are dropped before decoding, and only
what reaches a batch is decoded. webdataset's tar iterators split the tars into samples.

A training stream runs epoch after epoch without ending (the main process takes each epoch's batches
in turn), so workers never restart between epochs and the next epoch's shuffle buffer fills while
the last batches of the previous one are still in flight. Which worker plays which slot of an epoch
follows from the DataLoader's round-robin polling, so the batches arrive in the planned order.

Corrupted data never stops the stream: an unreadable tar tail, a missing or bad label and an
undecodable image each count as one skipped sample of its shard (per wanted key), reported with the
next batch.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from webdataset import tariterators

from cass_dist.data.gpu_decode import EncodedImages, check_jpeg
from cass_dist.data.health import CorruptDataError
from cass_dist.data.position import EpochPlan, Layout, Segment, plan_epoch, shuffle_buffer, slot_rng
from cass_dist.data.sharding import ShardTask, SplitIndex
from cass_dist.data.transforms import load_image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "npy")


@dataclass
class RawSample:
    key: str
    image: bytes
    label: object
    shard: str


class SkipCounter:
    """Corrupted samples, per shard file name, seen by one worker since the last batch it emitted."""

    def __init__(self) -> None:
        self.pending: Counter[str] = Counter()

    def add(self, shard: str, n: int = 1) -> None:
        if n:
            self.pending[shard] += n

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


def _continue(exc: Exception) -> bool:
    return True  # webdataset handler: a damaged member or tar tail ends nothing; missing keys are counted


def _parse_label(sample: dict, num_classes: int, multi_label: bool) -> object:
    """Return the sample's label from ``<key>.json`` ({"label": ...}) or webdataset's ``<key>.cls``."""
    if "json" in sample:
        label = json.loads(sample["json"])["label"]
    else:
        label = int(sample["cls"])
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
        shard = Path(task.path).name
        wanted, seen = set(task.keys), set()
        try:
            with open(task.path, "rb") as stream:
                files = tariterators.tar_file_expander([{"url": task.path, "stream": stream}], handler=_continue)
                for sample in tariterators.group_by_keys(files, handler=_continue):
                    key = sample["__key__"]
                    if key not in wanted or key in seen:
                        continue
                    seen.add(key)
                    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                    try:
                        label = _parse_label(sample, num_classes, multi_label)
                    except (KeyError, ValueError, TypeError):
                        label = None
                    if image is None or label is None:
                        counter.add(shard)
                        continue
                    yield RawSample(key, image, label, shard)
        except OSError:
            pass  # a missing or unreadable shard: its keys are counted below
        counter.add(shard, len(wanted) - len(seen))


class ShardStream(IterableDataset):
    """Iterable of worker batches ``{"image", "label", "key", "skipped", "epoch"}`` for one rank.

    Training (``layout`` given): epochs ``first_epoch``, ``first_epoch + 1``, ... (``epochs`` of them,
    or forever), the first one resumed from ``segments``; each worker slot delivers exactly its
    round-robin share of full batches per epoch, cycling over its shards should corruption leave it
    short. Evaluation: worker i reads ``eval_tasks[i]`` once. ``image`` is uint8 ``[B, C, H, W]``, or
    ``EncodedImages`` with ``decode="gpu"``; ``skipped`` maps shard names to corrupted samples.
    """

    def __init__(self, index: SplitIndex, *, selected: np.ndarray | None, rank: int, batch_size: int,
                 mode: str, size: list[int], num_classes: int, multi_label: bool, seed: int,
                 decode: str = "cpu", layout: Layout | None = None, first_epoch: int = 0,
                 segments: list[Segment] | None = None, epochs: int | None = None,
                 eval_tasks: list[list[ShardTask]] | None = None):
        super().__init__()
        self.index, self.selected, self.rank, self.batch_size = index, selected, rank, batch_size
        self.mode, self.size, self.decode = mode, size, decode
        self.num_classes, self.multi_label, self.seed = num_classes, multi_label, seed
        self.layout, self.first_epoch, self.segments, self.epochs = layout, first_epoch, segments or [], epochs
        self.eval_tasks = eval_tasks
        self._plans: dict[int, EpochPlan] = {}

    def for_epochs(self, first: int, epochs: int | None) -> ShardStream:
        """A copy that starts at epoch ``first`` (resumed only if it is this stream's first epoch)."""
        other = copy.copy(self)
        other.first_epoch, other.epochs, other._plans = first, epochs, {}
        other.segments = self.segments if first == self.first_epoch else []
        return other

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan (the first epoch resumed from ``segments``); the last two epochs' plans are kept."""
        if epoch not in self._plans:
            segments = self.segments if epoch == self.first_epoch else []
            plan = plan_epoch(self.index, self.selected, seed=self.seed, epoch=epoch, layout=self.layout,
                              segments=segments)
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1} | {epoch: plan}
        return self._plans[epoch]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        if self.layout is None:
            counter = SkipCounter()
            yield from self._batches(read_raw(self.eval_tasks[worker], counter, self.num_classes, self.multi_label),
                                     counter, epoch=0, final=True)
            return
        yield from self._training(worker)

    def _training(self, worker: int) -> Iterator[dict]:
        slots = self.layout.workers
        delivered = 0  # batches this DataLoader iteration has delivered, all workers together
        epochs = count(self.first_epoch) if self.epochs is None else range(self.first_epoch,
                                                                           self.first_epoch + self.epochs)
        for epoch in epochs:
            plan = self.plan(epoch)
            # The DataLoader polls worker (n % slots) for its n-th batch: the slot whose batch comes
            # n-th in this epoch is the one this worker plays.
            slot = (worker - delivered + plan.start) % slots
            delivered += plan.num_batches - plan.start
            quota = len(range(slot, plan.num_batches, slots))
            skip = len(range(slot, plan.start, slots))
            if quota == skip:
                continue
            counter = SkipCounter()
            raw = self._cycle(plan.slot_tasks(self.index, self.rank, slot), counter,
                              slot_rng(self.seed, epoch, self.rank, slot, plan.segment))
            for _ in range(skip * self.batch_size):  # resume: drop consumed samples before decoding them
                next(raw)
            yield from islice(self._batches(raw, counter, epoch=epoch, final=False), quota - skip)

    def _cycle(self, tasks: list[ShardTask], counter: SkipCounter, rng) -> Iterator[RawSample]:
        """The slot's samples through the shuffle buffer; further passes only cover shortfalls (corruption)."""
        order = list(tasks)
        while True:
            produced = False
            for sample in shuffle_buffer(read_raw(order, counter, self.num_classes, self.multi_label),
                                         self.layout.shuffle_buffer, rng):
                produced = True
                yield sample
            if not produced:
                raise CorruptDataError(f"no readable sample in {sorted({t.path for t in tasks})}: every wanted "
                                       f"sample of this worker's shards is corrupted or missing")
            rng.shuffle(order)

    def _load(self, sample: RawSample):
        if self.decode == "gpu":
            check_jpeg(sample.image)
            return sample.image
        return load_image(sample.image, self.mode, self.size)

    def _batches(self, raw: Iterator[RawSample], counter: SkipCounter, *, epoch: int, final: bool) -> Iterator[dict]:
        keys, images, labels = [], [], []
        for sample in raw:
            try:
                image = self._load(sample)
            except Exception:  # noqa: BLE001 - decoders raise many types for bad bytes; each is one skip
                counter.add(sample.shard)
                continue
            keys.append(sample.key)
            images.append(image)
            labels.append(sample.label)
            if len(keys) == self.batch_size:
                yield self._collate(keys, images, labels, counter.take(), epoch)
                keys, images, labels = [], [], []
        if final and (keys or counter.pending):
            yield self._collate(keys, images, labels, counter.take(), epoch)

    def _collate(self, keys: list[str], images: list, labels: list, skipped: dict[str, int], epoch: int) -> dict:
        dtype = torch.float32 if self.multi_label else torch.int64
        if self.decode == "gpu":
            image = EncodedImages.from_bytes(images, mode=self.mode, size=self.size, keys=keys)
        elif images:
            image = default_collate(images)  # in a worker: stacked straight into shared memory
        else:
            image = torch.empty(0, 3 if self.mode == "RGB" else 1, *self.size, dtype=torch.uint8)
        return {"image": image, "label": torch.tensor(labels, dtype=dtype), "key": keys, "skipped": skipped,
                "epoch": epoch}

"""``build_loader``: the streaming loader over a shard set, for training and for exact evaluation.

How the engine uses it (see tests/data/test_accelerate_split.py)::

    loader = build_loader(dir, "train", batch_size=64, train=True, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, num_workers="auto", device=accelerator.device)
    transform = loader.device_transform("pretrain", views=2)
    for batch in loader:                                   # one epoch; iterate again for the next one
        images = batch["image"].to(accelerator.device, non_blocking=True)    # uint8 [B, C, H, W]
        views = transform(images, seed=batch["seed"])       # float32 [B, 3, H, W] each
    state = loader.position(batches_consumed)               # save it; pass it back as start_batch

The loader already holds only this rank's share. Do NOT hand the inner ``torch`` DataLoader to
``accelerator.prepare``: for an IterableDataset, Accelerate 1.x either wraps it in
``IterableDatasetShard`` (each rank keeps 1/world_size of the batches it is given, so each rank sees
1/world_size of its own share and most data is lost) or, with the default ``dispatch_batches=True``
for iterable datasets, reads on rank 0 only and scatters, ignoring the other ranks' shares.
Passing the ``ShardLoader`` itself to ``prepare`` is harmless: it is not a DataLoader, so Accelerate
returns it unchanged, and batches must be moved to the device by the caller as above.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cass_dist.configs.base import ConfigError
from cass_dist.data.augment import KINDS, BatchAugment, manifest_transform
from cass_dist.data.gpu_decode import EncodedImages
from cass_dist.data.health import CorruptDataError
from cass_dist.data.manifest import Manifest, ManifestError, load_manifest
from cass_dist.data.position import EpochPlan, Layout, parse_position
from cass_dist.data.reader import ShardStream
from cass_dist.data.sharding import batches_per_rank, plan_eval, read_split_index
from cass_dist.data.splits import select_label_fraction

DEFAULT_BUFFER = 1000  # undecoded samples per worker: ~20-100 MB for 224 px JPEG/PNG
DECODERS = ("cpu", "gpu")
log = logging.getLogger("cass_dist")


def auto_num_workers(device: torch.device | str | None, *, cores: int | None = None,
                     local_processes: int | None = None) -> int:
    """Return the loader workers per process that ``num_workers="auto"`` means on this machine.

    ``cores`` defaults to the CPUs this process may run on (Slurm's allocation included), shared by
    ``local_processes`` (default: ``LOCAL_WORLD_SIZE``, set by ``accelerate launch`` and torchrun).
    Training on a GPU: ``min(8, cores per process - 1)``, leaving one core to the training process.
    On a CPU the model's own threads need the cores and a 32-224 px image costs far less to decode
    than to train on, so 0 below 8 cores per process (measured in docs/data.md), else a quarter.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per_process = max(1, cores // max(1, local_processes))
    if torch.device(device or "cpu").type == "cuda":
        return max(0, min(8, per_process - 1))
    return 0 if per_process < 8 else per_process // 4


def _batch_seed(seed: int, epoch: int, position: int, rank: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{position}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShardLoader:
    """Iterable of batches ``{"image": uint8 BxCxHxW, "label": int64 B | float32 BxC, "key": list[str], "seed": int}``.

    Training: each ``iter()`` is one epoch, the next one the following epoch (the first may be a
    resumed partial one); with ``persistent_workers`` the same workers serve every epoch.
    ``len(loader)`` is the number of batches the next ``iter()`` yields on this rank (identical on every
    rank); ``position(consumed)`` the saved form of the current epoch after ``consumed`` of them.
    Evaluation: every sample once across ranks per ``iter()``; ``len`` is an upper bound when corrupted
    samples are skipped. ``num_samples`` counts the epoch's samples across all ranks; ``skipped()`` the
    corrupted samples met so far on this rank (``skipped_by_shard()``, ``skipped_in_epoch(e)`` split it).
    """

    def __init__(self, dataset: ShardStream, *, manifest: Manifest, shards_dir: str, split: str, train: bool,
                 num_workers: int, batch_size: int, world_size: int, epoch: int, num_samples: int,
                 eval_batches: int = 0, drop_last: bool = True, pin_memory: bool = False, prefetch_factor: int = 2,
                 persistent_workers: bool = True, transform: str = "eval", views: int = 1, channels: int = 3,
                 image_size: list[int] | None = None):
        self.manifest, self.dataset, self.shards_dir, self.split = manifest, dataset, shards_dir, split
        self.train, self.num_workers, self.batch_size, self.world_size = train, num_workers, batch_size, world_size
        self.num_samples = num_samples
        self._eval_batches, self._drop_last = eval_batches, drop_last
        self._pin_memory, self._prefetch, self._persistent = pin_memory, prefetch_factor, persistent_workers
        self._transform, self._views, self._channels, self.image_size = transform, views, channels, image_size
        self._next_epoch = self._current_epoch = epoch
        self._stream: Iterator[dict] | None = None  # persistent training stream, and where it stands
        self._stream_epoch, self._stream_left = -1, 0
        self._eval_loader: DataLoader | None = None
        self._by_shard: Counter[str] = Counter()
        self._by_epoch: Counter[int] = Counter()

    # ------------------------------------------------------------------ sizes and positions
    def _plan(self, epoch: int) -> EpochPlan:
        return self.dataset.plan(epoch)

    def __len__(self) -> int:
        if not self.train:
            return self._eval_batches
        plan = self._plan(self._next_epoch)
        return plan.num_batches - plan.start

    @property
    def epoch(self) -> int:
        """The epoch of the latest ``iter()`` (before any: the epoch the loader starts in)."""
        return self._current_epoch

    def position(self, consumed: int) -> dict:
        """The current epoch's position after this rank consumed ``consumed`` batches of the latest ``iter()``.

        A plain-JSON dict (global samples and the layouts that consumed them), the same on every rank;
        ``build_loader(..., epoch=position["epoch"], start_batch=position)`` resumes there on any layout.
        """
        return self._plan(self._current_epoch).position(consumed)

    # ------------------------------------------------------------------ corrupted samples
    def skipped(self) -> int:
        """Return the corrupted samples skipped so far on this rank (all workers together)."""
        return sum(self._by_shard.values())

    def skipped_by_shard(self) -> dict[str, int]:
        """Corrupted samples skipped so far on this rank, per shard file name."""
        return dict(self._by_shard)

    def skipped_in_epoch(self, epoch: int) -> int:
        """Corrupted samples this rank met while reading ``epoch`` (training; evaluation counts as epoch 0)."""
        return self._by_epoch[epoch]

    def _count(self, batch: dict) -> None:
        skipped = batch.pop("skipped")
        if not skipped:
            return
        new = sorted(s for s in skipped if s not in self._by_shard)
        self._by_shard.update(skipped)
        self._by_epoch[batch["epoch"]] += sum(skipped.values())
        if new:  # every rank says so at once: no collective needed for the first warning
            log.warning(f"WARNING: corrupted samples skipped in {Path(self.shards_dir)} ({self.split}): "
                        + ", ".join(f"{s} ({skipped[s]})" for s in new)
                        + f"; check the set with `cass-shards verify {self.shards_dir}`")

    # ------------------------------------------------------------------ iteration
    def device_transform(self, kind: str | None = None, *, views: int | None = None) -> BatchAugment:
        """The device transform for these batches (default: the loader's ``transform`` and ``views``)."""
        return manifest_transform(kind or self._transform, self.manifest, image_size=self.image_size,
                                  views=views or self._views, channels=self._channels)

    def _dataloader(self, dataset: ShardStream, persistent: bool) -> DataLoader:
        extra = {"prefetch_factor": self._prefetch, "persistent_workers": persistent} if self.num_workers else {}
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self._pin_memory, **extra)

    def close(self) -> None:
        """Stop the workers now (they also stop when the loader is garbage-collected)."""
        self._stream, self._eval_loader, self._stream_left = None, None, 0

    def __iter__(self) -> Iterator[dict]:
        if not self.train:
            return self._evaluation()
        epoch = self._current_epoch = self._next_epoch
        self._next_epoch += 1
        plan = self._plan(epoch)
        count = plan.num_batches - plan.start
        if not self._persistent:
            return self._epoch(plan, count, lambda: iter(self._dataloader(self.dataset.for_epochs(epoch, 1), False)))
        if not (self._stream is not None and self._stream_epoch == epoch - 1 and self._stream_left == 0):
            # Not the epoch the running workers are at (first use, or the last epoch was left early).
            self._stream = iter(self._dataloader(self.dataset.for_epochs(epoch, None), False))
        self._stream_epoch, self._stream_left = epoch, count
        return self._epoch(plan, count, lambda: self._stream)

    def _epoch(self, plan: EpochPlan, count: int, source) -> Iterator[dict]:
        if count == 0:
            return
        batches = source()
        layout = plan.layout
        for i in range(count):
            batch = next(batches, None)
            if batch is None:
                raise CorruptDataError(f"{self.shards_dir}: the training stream ended after {i} of {count} batches")
            if self._persistent:
                self._stream_left -= 1
            self._count(batch)
            at = plan.samples_before + (plan.start + i) * layout.global_batch + self.dataset.rank * layout.batch_size
            yield self._make(batch, _batch_seed(self.dataset.seed, plan.epoch, at, self.dataset.rank))

    def _evaluation(self) -> Iterator[dict]:
        if self._eval_loader is None or not self._persistent:
            self._eval_loader = self._dataloader(self.dataset, self._persistent and self.num_workers > 0)
        held: list[dict] = []
        count = emitted = 0
        for batch in self._eval_loader:
            self._count(batch)
            if not len(batch["key"]):
                continue
            held.append(batch)
            count += len(batch["key"])
            while count >= self.batch_size:
                merged, held, count = _split(held, self.batch_size)
                yield self._make(merged, _batch_seed(self.dataset.seed, 0, emitted, self.dataset.rank))
                emitted += 1
        if held and not self._drop_last:
            merged, _, _ = _split(held, count)
            yield self._make(merged, _batch_seed(self.dataset.seed, 0, emitted, self.dataset.rank))

    @staticmethod
    def _make(batch: dict, seed: int) -> dict:
        return {"image": batch["image"], "label": batch["label"], "key": batch["key"], "seed": seed}


def _split(held: list[dict], size: int) -> tuple[dict, list[dict], int]:
    """Merge the first ``size`` samples of ``held`` into one batch; return it, the rest and the rest's count."""
    if len(held) == 1 and len(held[0]["key"]) == size:
        return held[0], [], 0  # worker batches are usually exactly one batch: no copy
    images = [b["image"] for b in held]
    image = EncodedImages.cat(images) if isinstance(images[0], EncodedImages) else torch.cat(images)
    label = torch.cat([b["label"] for b in held])
    keys = [k for b in held for k in b["key"]]
    first = {"image": image[:size], "label": label[:size], "key": keys[:size], "epoch": held[0]["epoch"]}
    rest = len(keys) - size
    tail = [{"image": image[size:], "label": label[size:], "key": keys[size:], "epoch": held[0]["epoch"]}] if rest else []
    return first, tail, rest


def _resolve_size(manifest: Manifest, image_size, origin: str) -> list[int]:
    if image_size is not None:
        return [image_size, image_size] if isinstance(image_size, int) else [int(v) for v in image_size]
    if manifest.image.size is None:
        raise ManifestError(f"{origin}: images have mixed sizes (manifest image.size is null); pass image_size")
    return [int(v) for v in manifest.image.size]


def build_loader(shards_dir: str | os.PathLike, split: str, *, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, num_workers: int | str = 0, seed: int = 0, epoch: int = 0,
                 image_size: int | tuple[int, int] | None = None, label_fraction: float = 1.0,
                 transform: str = "auto", start_batch: int | Mapping = 0, drop_last: bool | None = None,
                 fraction_seed: int = 0, channels: int = 3, shuffle_buffer: int = DEFAULT_BUFFER,
                 pin_memory: bool | None = None, prefetch_factor: int = 2, persistent_workers: bool = True,
                 views: int = 1, decode: str = "cpu", device: torch.device | str | None = None) -> ShardLoader:
    """Return a ShardLoader streaming ``split`` of the shard set in ``shards_dir`` for one rank.

    Workers decode each image and resize it to ``image_size`` (default: the stored size), and ship
    uint8 batches; augmentation and normalisation run on the training device through
    ``loader.device_transform()``, which defaults to ``transform`` ("auto": pretrain when training,
    else eval; "pretrain", "ssl", "finetune", "eval"), ``views`` and ``channels`` (3 expands L images).

    Training (``train=True``): shards shuffled by (seed, epoch), split by rank then worker, a shuffle
    buffer of ``shuffle_buffer`` undecoded samples per worker, ``floor(N / (batch_size * world_size))``
    full batches per rank (``ceil`` with ``drop_last=False``). ``start_batch`` resumes ``epoch``
    mid-way: an int k skips k batches under this layout, a ``loader.position(...)`` dict resumes on
    any layout with no sample repeated or skipped. Evaluation: every sample exactly once across ranks.
    ``label_fraction`` < 1 keeps the stratified subset chosen by ``select_label_fraction`` (seeded by
    ``fraction_seed``, not ``seed``). ``num_workers="auto"`` sizes the workers for ``device`` (see
    ``auto_num_workers``); ``pin_memory`` None pins on CUDA; ``persistent_workers`` keeps the workers
    across epochs (training) and ``iter()`` calls (evaluation). ``decode="gpu"`` ships JPEG bytes that
    ``batch["image"].to(device)`` decodes there (nvJPEG).
    Raises ManifestError for a missing/invalid/unknown-version manifest or index, PositionError for a
    position that does not fit, ValueError for bad arguments (naming the argument) or a training split
    smaller than one global batch.
    """
    manifest = load_manifest(shards_dir)
    origin = str(Path(shards_dir))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_workers == "auto":
        num_workers = auto_num_workers(device)
    if not isinstance(num_workers, int) or num_workers < 0 or shuffle_buffer < 1:
        raise ValueError(f"num_workers must be >= 0 or 'auto' and shuffle_buffer >= 1, got {num_workers!r}, "
                         f"{shuffle_buffer}")
    if start_batch and not train:
        raise ValueError("start_batch is only supported for training loaders (train=True)")
    if transform == "auto":
        transform = "pretrain" if train else "eval"
    if transform not in KINDS:
        raise ValueError(f"transform must be one of {list(KINDS)}, got {transform!r}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {list(DECODERS)}, got {decode!r}")
    if decode == "gpu" and manifest.image.format != "jpg":
        raise ValueError(f"{origin}: decode 'gpu' needs JPEG shards; these hold {manifest.image.format}")
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    size = _resolve_size(manifest, image_size, origin)
    pin_memory = torch.device(device or "cpu").type == "cuda" if pin_memory is None else pin_memory

    index = read_split_index(shards_dir, manifest, split)
    selected = None
    if label_fraction != 1.0:
        chosen = select_label_fraction([index.labels[k] for k in index.keys], label_fraction,
                                       seed=fraction_seed, task=manifest.task)
        selected = np.zeros(len(index.labels), dtype=bool)
        selected[np.asarray(chosen, dtype=np.int64)] = True
    total = int(selected.sum()) if selected is not None else manifest.split(split).count
    drop_last = train if drop_last is None else drop_last
    common = dict(selected=selected, rank=rank, batch_size=batch_size, mode=manifest.image.mode, size=size,
                  num_classes=manifest.num_classes, multi_label=manifest.task == "multi-label", seed=seed,
                  decode=decode)
    loader_args = dict(manifest=manifest, shards_dir=origin, split=split, train=train, num_workers=num_workers,
                       batch_size=batch_size, world_size=world_size, epoch=epoch, drop_last=drop_last,
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                       transform=transform, views=views, channels=channels, image_size=size)
    if train:
        if batches_per_rank(total, batch_size, world_size, drop_last) == 0:
            raise ConfigError(f"{origin}: split {split!r} has {total} samples (label_fraction={label_fraction}), "
                             f"fewer than one global batch of batch_size x world_size = {batch_size * world_size}")
        layout = Layout(world_size, batch_size, max(1, num_workers), shuffle_buffer, drop_last)
        segments = parse_position(start_batch, layout=layout, epoch=epoch)
        dataset = ShardStream(index, layout=layout, first_epoch=epoch, segments=segments, **common)
        plan = dataset.plan(epoch)  # raises PositionError for a position past the epoch's end
        samples = plan.num_batches * batch_size * world_size + plan.samples_before
        return ShardLoader(dataset, num_samples=samples, **loader_args)
    plan = plan_eval(index, selected, rank=rank, world_size=world_size, num_workers=num_workers)
    dataset = ShardStream(index, eval_tasks=plan.worker_tasks, **common)
    rounding = math.floor if drop_last else math.ceil
    return ShardLoader(dataset, num_samples=total, eval_batches=rounding(plan.rank_samples / batch_size),
                       **loader_args)


def data_position(loader, consumed: int) -> dict:
    """``loader.position(consumed)`` for loaders that have one (ShardLoader), else {} (resume by batch count)."""
    return loader.position(consumed) if hasattr(loader, "position") else {}


def sum_across_ranks(count: int, accelerator=None) -> int:
    """Return ``count`` summed over all processes of ``accelerator`` (itself when None or single-process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return int(count)
    total = accelerator.reduce(torch.tensor([int(count)], device=accelerator.device), reduction="sum")
    return int(total.item())

"""``build_loader``: the streaming loader over a shard set, for training and for exact evaluation.

How to use it with Accelerate (see tests/data/test_accelerate_split.py)::

    loader = build_loader(dir, "train", batch_size=64, train=True, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, num_workers=8, epoch=epoch)
    for batch in loader:
        images = batch["image"].to(accelerator.device, non_blocking=True)

The loader already holds only this rank's share. Do NOT hand the inner ``torch`` DataLoader to
``accelerator.prepare``: for an IterableDataset, Accelerate 1.x either wraps it in
``IterableDatasetShard`` (each rank keeps 1/world_size of the batches it is given, so each rank sees
1/world_size of its own share and most data is lost) or, with the default ``dispatch_batches=True``
for iterable datasets, reads on rank 0 only and scatters, ignoring the other ranks' shares.
Passing the ``ShardLoader`` itself to ``prepare`` is harmless: it is not a DataLoader, so Accelerate
returns it unchanged, and batches must be moved to the device by the caller as above.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cass_dist.configs.base import ConfigError
from cass_dist.data.manifest import Manifest, ManifestError, load_manifest
from cass_dist.data.reader import ShardStream
from cass_dist.data.sharding import batches_per_rank, plan_rank, read_split_index, worker_batch_counts
from cass_dist.data.splits import select_label_fraction
from cass_dist.data.transforms import BatchNormalizer, Views, build_transform

DEFAULT_BUFFER = 1000  # undecoded samples per worker: ~20-100 MB for 224 px JPEG/PNG


class ShardLoader:
    """Iterable of batches ``{"image": float32 BxCxHxW, "label": int64 B | float32 BxC, "key": list[str]}``.

    ``len(loader)`` is the number of batches this rank yields this epoch (training: identical on every
    rank; evaluation: an upper bound when corrupted samples are skipped). ``num_samples`` counts the
    samples of the epoch across all ranks; ``skipped()`` the corrupted samples met so far on this rank.
    """

    def __init__(self, dataset: ShardStream, *, manifest: Manifest, num_workers: int, batch_size: int,
                 num_batches: int, num_samples: int, exact_batches: bool, drop_last: bool,
                 normalize: BatchNormalizer, pin_memory: bool = False, prefetch_factor: int = 2):
        self.manifest = manifest
        self.dataset = dataset
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.num_samples = num_samples
        self._num_batches = num_batches
        self._exact = exact_batches  # training: stop after exactly num_batches full batches
        self._drop_last = drop_last
        self._normalize = normalize
        self._pin_memory = pin_memory
        self._prefetch = prefetch_factor
        self._skipped = 0

    def __len__(self) -> int:
        return self._num_batches

    def skipped(self) -> int:
        """Return the corrupted samples skipped so far on this rank (all workers together)."""
        return self._skipped

    def _worker_batches(self) -> Iterator[dict]:
        extra = {"prefetch_factor": self._prefetch} if self.num_workers > 0 else {}
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self._pin_memory, **extra)
        for batch in loader:
            self._skipped += batch.pop("skipped")
            if len(batch["key"]):
                yield batch

    def __iter__(self) -> Iterator[dict]:
        if self._exact and self._num_batches == 0:
            return  # resumed at the very end of an epoch: start no worker
        emitted, held = 0, 0
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        keys: list[str] = []
        for batch in self._worker_batches():
            images.append(batch["image"])
            labels.append(batch["label"])
            keys.extend(batch["key"])
            held += len(batch["key"])
            while held >= self.batch_size:
                if self._exact and emitted == self._num_batches:
                    return
                # Worker batches are usually exactly batch_size: then pass them on without a copy.
                image = images[0] if len(images) == 1 else torch.cat(images)
                label = labels[0] if len(labels) == 1 else torch.cat(labels)
                yield self._make(image[:self.batch_size], label[:self.batch_size], keys[:self.batch_size])
                emitted += 1
                held -= self.batch_size
                images = [image[self.batch_size:]] if held else []
                labels = [label[self.batch_size:]] if held else []
                keys = keys[self.batch_size:]
            if self._exact and emitted == self._num_batches:
                return  # before asking the workers for more: nothing past the epoch is decoded here
        if held and not self._drop_last and not self._exact:
            yield self._make(torch.cat(images), torch.cat(labels), keys)

    def _make(self, image: torch.Tensor, label: torch.Tensor, keys: list[str]) -> dict:
        return {"image": self._normalize(image), "label": label, "key": keys}


def _resolve_size(manifest: Manifest, image_size, origin: str) -> list[int]:
    if image_size is not None:
        return [image_size, image_size] if isinstance(image_size, int) else [int(v) for v in image_size]
    if manifest.image.size is None:
        raise ManifestError(f"{origin}: images have mixed sizes (manifest image.size is null); pass image_size")
    return [int(v) for v in manifest.image.size]


def build_loader(shards_dir: str | os.PathLike, split: str, *, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, epoch: int = 0,
                 image_size: int | tuple[int, int] | None = None, label_fraction: float = 1.0,
                 transform: str | Callable[[torch.Tensor], torch.Tensor] = "auto", start_batch: int = 0,
                 drop_last: bool | None = None, fraction_seed: int = 0, channels: int | None = 3,
                 shuffle_buffer: int = DEFAULT_BUFFER, pin_memory: bool = False,
                 prefetch_factor: int = 2, views: int = 1) -> ShardLoader:
    """Return a ShardLoader streaming ``split`` of the shard set in ``shards_dir`` for one rank.

    Training (``train=True``): shards shuffled by (seed, epoch), split by rank then worker, a shuffle
    buffer of ``shuffle_buffer`` undecoded samples per worker, ``floor(N / (batch_size * world_size))``
    full batches per rank (``ceil`` with ``drop_last=False``), and ``start_batch=k`` resumes at batch
    k without decoding the first k batches. Evaluation: every sample exactly once across ranks.
    ``label_fraction`` < 1 keeps the stratified subset chosen by ``select_label_fraction`` (seeded by
    ``fraction_seed``, not ``seed``). ``transform`` is "auto" (pretrain when training, else eval),
    "pretrain", "finetune", "eval" or a callable on uint8 CxHxW tensors returning uint8 tensors of one
    size. ``views=V`` > 1 augments each image V times independently: batches hold ``[B, V, C, H, W]``.
    ``channels=3`` expands L images for the models; None keeps the stored channels.
    Raises ManifestError for a missing/invalid/unknown-version manifest or index, ValueError for bad
    arguments (naming the argument) or a training split smaller than one global batch.
    """
    manifest = load_manifest(shards_dir)
    origin = str(Path(shards_dir))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_workers < 0 or shuffle_buffer < 1:
        raise ValueError(f"num_workers must be >= 0 and shuffle_buffer >= 1, got {num_workers}, {shuffle_buffer}")
    if start_batch and not train:
        raise ValueError("start_batch is only supported for training loaders (train=True)")
    size = _resolve_size(manifest, image_size, origin)
    if transform == "auto":
        transform = "pretrain" if train else "eval"
    image_transform = build_transform(transform, size) if isinstance(transform, str) else transform
    if not callable(image_transform):
        raise ValueError(f"transform must be a name or a callable, got {transform!r}")
    if views != 1:
        image_transform = Views(image_transform, views)  # raises for views < 1

    index = read_split_index(shards_dir, manifest, split)
    selected = None
    if label_fraction != 1.0:
        keys = index.keys
        chosen = select_label_fraction([index.labels[k] for k in keys], label_fraction,
                                       seed=fraction_seed, task=manifest.task)
        selected = {keys[i] for i in chosen}
    total = len(selected) if selected is not None else manifest.split(split).count
    drop_last = train if drop_last is None else drop_last

    common = dict(train=train, batch_size=batch_size, transform=image_transform, mode=manifest.image.mode,
                  size_hint=size, num_classes=manifest.num_classes, multi_label=manifest.task == "multi-label",
                  seed=seed, epoch=epoch, rank=rank, buffer_size=shuffle_buffer)
    if train:
        num_batches = batches_per_rank(total, batch_size, world_size, drop_last)
        if num_batches == 0:
            raise ConfigError(f"{origin}: split {split!r} has {total} samples (label_fraction={label_fraction}), "
                             f"fewer than one global batch of batch_size x world_size = {batch_size * world_size}")
        if not 0 <= start_batch <= num_batches:
            raise ValueError(f"start_batch must be in [0, {num_batches}], got {start_batch}")
        # A worker with no batch to deliver would end early and break the round-robin order.
        num_workers = min(num_workers, num_batches)
        slots = max(1, num_workers)
        per_worker = worker_batch_counts(num_batches, slots)
        plan = plan_rank(index, selected, train=True, seed=seed, epoch=epoch, rank=rank,
                         world_size=world_size, num_workers=num_workers, batches_per_worker=per_worker,
                         batch_size=batch_size)
        dataset = ShardStream(plan.worker_tasks, skip_batches=worker_batch_counts(start_batch, slots),
                              slot_offset=start_batch % slots, **common)
        yielded, samples = num_batches - start_batch, num_batches * batch_size * world_size
    else:
        plan = plan_rank(index, selected, train=False, seed=seed, epoch=epoch, rank=rank,
                         world_size=world_size, num_workers=num_workers)
        dataset = ShardStream(plan.worker_tasks, **common)
        rounding = math.floor if drop_last else math.ceil
        yielded, samples = rounding(plan.rank_samples / batch_size), total
    normalize = BatchNormalizer(manifest.image.mean, manifest.image.std, channels)
    return ShardLoader(dataset, manifest=manifest, num_workers=num_workers, batch_size=batch_size,
                       num_batches=yielded, num_samples=samples, exact_batches=train, drop_last=drop_last,
                       normalize=normalize, pin_memory=pin_memory, prefetch_factor=prefetch_factor)


def sum_across_ranks(count: int, accelerator=None) -> int:
    """Return ``count`` summed over all processes of ``accelerator`` (itself when None or single-process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return int(count)
    total = accelerator.reduce(torch.tensor([int(count)], device=accelerator.device), reduction="sum")
    return int(total.item())

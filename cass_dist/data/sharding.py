"""Who reads what: deterministic assignment of samples to ranks and DataLoader workers.

Every plan here is a pure function of the manifest, the split index and a few integers, so all ranks
compute the same plan without talking to each other.

The unit of reading is a shard (a worker opens whole tar files and streams them), but the unit of
*assignment* is the sample: the split's keys are laid out in (shuffled) shard order and cut into
contiguous ranges, first one range per rank, then one per worker. This keeps open_clip's cheap
sequential tar reads while giving exact, balanced coverage even with fewer shards than
ranks x workers (several workers then read disjoint parts of one shard) and with label fractions
(only the selected keys count).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cass_dist.data.manifest import Manifest, ManifestError


@dataclass(frozen=True)
class ShardTask:
    """Read ``path`` and keep only ``keys`` (listed in shard order)."""

    path: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class SplitIndex:
    """The keys and labels of one split, grouped by shard in shard order."""

    shard_paths: list[str]
    shard_keys: list[list[str]]
    labels: dict[str, object]  # key -> int or 0/1 list

    @property
    def keys(self) -> list[str]:
        return [key for keys in self.shard_keys for key in keys]


def read_split_index(shards_dir: str | os.PathLike, manifest: Manifest, split: str) -> SplitIndex:
    """Load ``index-<split>.json`` and group its keys by shard using the manifest's shard counts.

    Returns a SplitIndex. Raises ManifestError when the split is unknown, the index file is missing
    or unreadable, or its length disagrees with the manifest.
    """
    info = manifest.split(split)
    path = Path(shards_dir) / (info.index or f"index-{split}.json")
    try:
        data = json.loads(path.read_text())
        keys, labels = list(data["keys"]), list(data["labels"])
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} not found: the shard set has no key index for split {split!r}") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: expected JSON with 'keys' and 'labels' lists ({exc})") from exc
    if len(keys) != info.count or len(labels) != info.count:
        raise ManifestError(f"{path}: {len(keys)} keys and {len(labels)} labels, but the manifest says "
                            f"split {split!r} has {info.count} samples")
    shard_keys, start = [], 0
    for shard in info.shards:
        shard_keys.append(keys[start:start + shard.count])
        start += shard.count
    paths = [str(Path(shards_dir) / shard.name) for shard in info.shards]
    return SplitIndex(paths, shard_keys, dict(zip(keys, labels)))


def shard_order(num_shards: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """Return the order in which shards are laid out: a (seed, epoch) permutation, or 0..n-1."""
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)]


def cut(n: int, parts: int) -> list[tuple[int, int]]:
    """Cut range(n) into ``parts`` contiguous (start, stop) ranges whose sizes differ by at most one."""
    bounds = [i * n // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def cut_by_sizes(n: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Cut range(n) into ranges of the given sizes; the leftover is spread evenly over all of them.

    When ``n`` is short of the sizes' sum (training without drop_last), it is cut evenly instead.
    """
    if n < sum(sizes):
        return cut(n, len(sizes))
    extra = cut(n - sum(sizes), len(sizes))
    bounds, start = [], 0
    for size, (a, b) in zip(sizes, extra):
        bounds.append((start, start + size + b - a))
        start += size + b - a
    return bounds


def worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    """Batches each worker delivers when a DataLoader polls its workers round robin."""
    return [len(range(w, num_batches, num_workers)) for w in range(num_workers)]


def tasks_for(sequence: list[tuple[int, str]], paths: list[str]) -> list[ShardTask]:
    """Group a run of (shard id, key) pairs into one ShardTask per consecutive shard."""
    tasks: list[ShardTask] = []
    current, keys = None, []
    for shard, key in sequence:
        if shard != current and keys:
            tasks.append(ShardTask(paths[current], tuple(keys)))
            keys = []
        current = shard
        keys.append(key)
    if keys:
        tasks.append(ShardTask(paths[current], tuple(keys)))
    return tasks


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads this epoch: one task list per worker, and how many samples it holds."""

    worker_tasks: list[list[ShardTask]]
    rank_samples: int  # samples assigned to this rank (eval: what it yields, train: what it may read)


def plan_rank(index: SplitIndex, selected: set[str] | None, *, train: bool, seed: int, epoch: int,
              rank: int, world_size: int, num_workers: int, batches_per_worker: list[int] | None = None,
              batch_size: int = 1) -> RankPlan:
    """Plan the reading of one rank: shard order, then a contiguous range per rank, then per worker.

    ``selected`` restricts the split to a subset of keys (label fractions). In training,
    ``batches_per_worker`` sizes each worker's range to what the round-robin DataLoader will take from
    it, so an epoch reads every sample of the rank's range at most once. Returns a RankPlan.
    """
    order = shard_order(len(index.shard_paths), shuffle=train, seed=seed, epoch=epoch)
    sequence = [(s, key) for s in order for key in index.shard_keys[s] if selected is None or key in selected]
    start, stop = cut(len(sequence), world_size)[rank]
    mine = sequence[start:stop]
    workers = max(1, num_workers)
    if batches_per_worker is not None:
        ranges = cut_by_sizes(len(mine), [b * batch_size for b in batches_per_worker])
    else:
        ranges = cut(len(mine), workers)
    return RankPlan([tasks_for(mine[a:b], index.shard_paths) for a, b in ranges], len(mine))


def batches_per_rank(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Training steps per rank per epoch, identical on every rank."""
    per_step = batch_size * world_size
    return num_samples // per_step if drop_last else math.ceil(num_samples / per_step)

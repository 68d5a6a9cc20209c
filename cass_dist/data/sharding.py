"""Who reads what: deterministic assignment of samples to ranks and DataLoader workers.

Every plan here is a pure function of the manifest, the split index and a few integers, so all ranks
(and all their workers) compute the same plan without talking to each other.

The unit of reading is a shard (a worker opens whole tar files and streams them), but the unit of
*assignment* is the sample: the split's keys are laid out in (shuffled) shard order and cut into
contiguous ranges, first one range per rank, then one per worker. This keeps open_clip's cheap
sequential tar reads while giving exact, balanced coverage even with fewer shards than
ranks x workers (several workers then read disjoint parts of one shard) and with label fractions
(only the selected keys count). Samples are handled as integer ids (positions in the split index),
so a plan over a million samples costs a few numpy arrays, not a million Python objects.
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

    @property
    def shard_bounds(self) -> np.ndarray:
        """``bounds[s]:bounds[s + 1]`` are the ids of shard s's keys (ids index ``keys``)."""
        return np.concatenate([[0], np.cumsum([len(k) for k in self.shard_keys])]).astype(np.int64)


def read_split_index(shards_dir: str | os.PathLike, manifest: Manifest, split: str) -> SplitIndex:
    """Load ``index-<split>.json`` and group its keys by shard using the manifest's shard counts.

    Returns a SplitIndex. Raises ManifestError when the split is unknown, the index file is missing,
    unreadable or not ``{"keys": [str, ...], "labels": [...]}``, or its length disagrees with the manifest.
    """
    info = manifest.split(split)
    path = Path(shards_dir) / (info.index or f"index-{split}.json")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} not found: the shard set has no key index for split {split!r}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not isinstance(data.get("labels"), list):
        raise ManifestError(f"{path}: expected a JSON object with 'keys' and 'labels' lists, "
                            f"got {type(data).__name__}")
    keys, labels = data["keys"], data["labels"]
    if not all(isinstance(k, str) for k in keys):
        raise ManifestError(f"{path}: every key must be a string")
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


def epoch_sequence(index: SplitIndex, selected: np.ndarray | None, *, shuffle: bool, seed: int,
                   epoch: int) -> np.ndarray:
    """Return the ids of the epoch's samples in reading order: shards in ``shard_order``, keys in shard order.

    ``selected`` is a boolean mask over the ids (label fractions) or None for all of them.
    """
    bounds = index.shard_bounds
    order = shard_order(len(index.shard_paths), shuffle=shuffle, seed=seed, epoch=epoch)
    parts = [np.arange(bounds[s], bounds[s + 1]) for s in order]
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return ids[selected[ids]] if selected is not None else ids


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


def tasks_for(ids: np.ndarray, index: SplitIndex) -> list[ShardTask]:
    """Group a run of sample ids into one ShardTask per run of consecutive ids from one shard."""
    if len(ids) == 0:
        return []
    bounds = index.shard_bounds
    shards = np.searchsorted(bounds, ids, side="right") - 1
    breaks = np.flatnonzero(np.diff(shards)) + 1
    tasks = []
    for run in np.split(np.arange(len(ids)), breaks):
        shard = int(shards[run[0]])
        keys = index.shard_keys[shard]
        tasks.append(ShardTask(index.shard_paths[shard], tuple(keys[i - bounds[shard]] for i in ids[run])))
    return tasks


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The (start, stop) of rank ``rank``'s contiguous share of an n-sample sequence."""
    return cut(n, world_size)[rank]


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads this epoch: one task list per worker, and how many samples it holds."""

    worker_tasks: list[list[ShardTask]]
    rank_samples: int  # samples assigned to this rank


def plan_eval(index: SplitIndex, selected: np.ndarray | None, *, rank: int, world_size: int,
              num_workers: int) -> RankPlan:
    """Plan one rank's share of an evaluation pass: shard order, a contiguous range per rank, then per worker.

    Together the ranks' plans hold every (selected) sample of the split exactly once.
    """
    sequence = epoch_sequence(index, selected, shuffle=False, seed=0, epoch=0)
    start, stop = rank_range(len(sequence), rank, world_size)
    mine = sequence[start:stop]
    ranges = cut(len(mine), max(1, num_workers))
    return RankPlan([tasks_for(mine[a:b], index) for a, b in ranges], len(mine))


def batches_per_rank(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Training steps per rank per epoch, identical on every rank."""
    per_step = batch_size * world_size
    return num_samples // per_step if drop_last else math.ceil(num_samples / per_step)

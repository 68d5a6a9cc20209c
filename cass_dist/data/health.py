"""Corrupt data is loud: skipped samples per shard, a limit per epoch, and sha256 checks before training.

The training loops call ``SkipTracker.check`` at their log steps only: it gathers every rank's
per-shard counts in one small all-reduce (no host sync per step), says which shards lost samples
the first time each one shows up, and stops the run with ``CorruptDataError`` once an epoch has lost
more than ``max_skipped_fraction`` of its samples. Each loader also warns on its own rank at the
first skip in a shard (no collective needed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from cass_dist.data.manifest import Manifest, load_manifest, sha256_of
from cass_dist.errors import CassError

log = logging.getLogger("cass_dist")


class CorruptDataError(CassError, RuntimeError):
    """An epoch skipped more corrupted samples than ``data.max_skipped_fraction`` allows."""


class ShardDigestError(CassError, ValueError):
    """A shard is missing or its bytes differ from the sha256 recorded in manifest.json."""


def _reduce_sum(values: list[int], accelerator) -> list[int]:
    if accelerator is None or accelerator.num_processes == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=accelerator.device)
    return [int(v) for v in accelerator.reduce(tensor, reduction="sum").tolist()]


class SkipTracker:
    """Run-wide corrupted-sample counts of one training split, checked at log steps.

    ``print_fn`` gets the messages meant for the console (the engine passes ``run.print``).
    """

    def __init__(self, manifest: Manifest, shards_dir: str | os.PathLike, split: str, max_fraction: float, *,
                 print_fn: Callable[[str], None] = log.warning):
        self.shards_dir, self.split, self.max_fraction, self.print = str(shards_dir), split, max_fraction, print_fn
        self.shards = [shard.name for shard in manifest.split(split).shards]
        self.epoch_samples = manifest.split(split).count
        self.by_shard: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.by_shard.values())

    def check(self, loader, accelerator=None, epoch: int = 0) -> int:
        """All-reduce ``loader``'s counts (call on every rank) and return the samples skipped so far, all ranks.

        Raises CorruptDataError, on every rank alike, when epoch ``epoch`` or the one before it lost
        more than ``max_fraction`` of the epoch's samples.
        """
        counts = loader.skipped_by_shard() if hasattr(loader, "skipped_by_shard") else {}
        in_epoch = loader.skipped_in_epoch if hasattr(loader, "skipped_in_epoch") else (lambda e: 0)
        local = [int(counts.get(name, 0)) for name in self.shards] + [in_epoch(epoch - 1), in_epoch(epoch)]
        summed = _reduce_sum(local, accelerator)
        by_shard = {name: n for name, n in zip(self.shards, summed) if n}
        new = [name for name in by_shard if name not in self.by_shard]
        self.by_shard = by_shard
        if new:
            self.print(f"WARNING: {self.total} corrupted sample(s) skipped so far in {self.shards_dir} "
                       f"({self.split}): {self._named(new)}")
        samples = getattr(loader, "num_samples", 0) or self.epoch_samples
        worst = max(summed[-2:])
        if worst > self.max_fraction * samples:
            raise CorruptDataError(
                f"data.max_skipped_fraction: an epoch of {self.shards_dir} ({self.split}) skipped {worst} "
                f"corrupted samples of {samples} ({worst / samples:.1%}), more than {self.max_fraction:.1%}: "
                f"{self._named(list(by_shard))}; run `cass-shards verify {self.shards_dir}`, re-create or "
                f"remove the damaged shards, or raise data.max_skipped_fraction")
        return self.total

    def _named(self, names: list[str]) -> str:
        return ", ".join(f"{name} ({self.by_shard[name]})" for name in names)

    def describe(self) -> str:
        """One line for the final summary ("" when nothing was skipped)."""
        if not self.by_shard:
            return ""
        return (f"WARNING: {self.total} corrupted sample(s) skipped in {self.shards_dir} ({self.split}): "
                f"{self._named(list(self.by_shard))}; run `cass-shards verify {self.shards_dir}`")


def check_digests(shards_dir: str | os.PathLike, splits: Iterable[str], *, accelerator=None) -> int:
    """Check every shard of ``splits`` against manifest.json's size and sha256; return how many were checked.

    With ``accelerator`` the ranks share the hashing (rank r checks shards r, r + world, ...) and
    agree on the result. Raises ShardDigestError naming every bad shard (on every rank), and
    ManifestError for a bad manifest. Splits the set does not have are ignored.
    """
    root = Path(shards_dir)
    manifest = load_manifest(root)
    shards = [shard for name in dict.fromkeys(splits) if name in manifest.splits
              for shard in manifest.splits[name].shards]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    bad = [0] * len(shards)
    for i in range(rank, len(shards), world):
        path = root / shards[i].name
        ok = path.is_file() and path.stat().st_size == shards[i].bytes and sha256_of(path) == shards[i].sha256
        bad[i] = int(not ok)
    bad = _reduce_sum(bad, accelerator)
    names = [shards[i].name for i, b in enumerate(bad) if b]
    if names:
        raise ShardDigestError(f"data.verify_shards: {len(names)} shard(s) of {root} are missing or differ "
                               f"from the sha256 in manifest.json: {', '.join(names)}; run "
                               f"`cass-shards verify {root}` for details")
    return len(shards)

"""Where a training epoch stands, in global samples, and how a loader of any layout goes on from there.

A training rank reads a contiguous range of the epoch's sequence (see ``sharding``), cut into one
range per worker slot, each read through a seeded shuffle buffer. Which samples "the first k
batches" are therefore depends on the *layout*: world size, per-rank batch, worker slots and
buffer size. A position records the layouts that consumed the epoch so far, as segments::

    {"epoch": 3, "samples": 2048, "segments": [{"world_size": 8, "batch_size": 64, "workers": 6,
                                                "shuffle_buffer": 1000, "drop_last": true, "batches": 4}]}

A loader resumed with the same layout skips the consumed batches in its workers (the straight
run's order, exactly). A loader with another layout replays, on sample ids only (nothing is read or
decoded), which samples each earlier segment consumed, and plans the rest of the epoch over its own
layout: no sample of the epoch is repeated or skipped, whatever the number of processes. The
replay is exact for intact shards; a corrupted sample (skipped by a worker) shifts what its worker
read next, which the replay cannot know without reading the data.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from itertools import islice
from typing import TypeVar

import numpy as np

from cass_dist.data.sharding import (
    ShardTask,
    SplitIndex,
    batches_per_rank,
    cut_by_sizes,
    epoch_sequence,
    rank_range,
    tasks_for,
    worker_batch_counts,
)
from cass_dist.errors import CassError

T = TypeVar("T")


class PositionError(CassError, ValueError):
    """A saved data position does not fit this epoch (malformed, another epoch, past its end)."""


@dataclass(frozen=True)
class Layout:
    """How one training epoch is read: everything that decides which samples a batch holds."""

    world_size: int
    batch_size: int  # per rank
    workers: int  # worker slots, max(1, num_workers)
    shuffle_buffer: int
    drop_last: bool = True

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size


@dataclass(frozen=True)
class Segment:
    """``batches`` batches per rank consumed under ``layout``."""

    layout: Layout
    batches: int

    def to_dict(self) -> dict:
        return {**asdict(self.layout), "batches": self.batches}


def shuffle_buffer(samples: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Yield ``samples`` in a locally shuffled order through a reservoir of ``size`` (undecoded) items."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def slot_rng(seed: int, epoch: int, rank: int, slot: int, segment: int) -> random.Random:
    """The shuffle-buffer RNG of one worker slot (segment 0 keeps the name of unsegmented epochs)."""
    return random.Random(f"{seed}/{epoch}/{rank}/{slot}" + (f"/{segment}" if segment else ""))


def parse_position(value, *, layout: Layout, epoch: int) -> list[Segment]:
    """Return the segments of a saved position.

    ``value`` is None or 0 (the epoch's start), an int k (k batches per rank under ``layout``: the
    form of checkpoints without a position), or a dict made by ``EpochPlan.position``. Raises
    PositionError naming what is wrong.
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise PositionError(f"start_batch must be >= 0, got {value}")
        return [Segment(layout, value)]
    if not isinstance(value, Mapping):
        raise PositionError(f"data position: expected an int or a mapping, got {type(value).__name__}")
    if not value:
        return []
    if value.get("epoch", epoch) != epoch:
        raise PositionError(f"data position is in epoch {value.get('epoch')!r}, but the loader is for epoch {epoch}")
    segments = value.get("segments")
    if not isinstance(segments, list):
        raise PositionError(f"data position: 'segments' must be a list, got {segments!r}")
    out = []
    fields = ("world_size", "batch_size", "workers", "shuffle_buffer")
    for seg in segments:
        try:
            numbers = [int(seg[f]) for f in (*fields, "batches")]
            drop_last = bool(seg.get("drop_last", True))
        except (KeyError, TypeError, ValueError) as exc:
            raise PositionError(f"data position: malformed segment {seg!r} ({exc})") from exc
        if min(numbers[:4]) < 1 or numbers[4] < 0:
            raise PositionError(f"data position: segment {seg!r} has a count below its minimum")
        out.append(Segment(Layout(*numbers[:4], drop_last=drop_last), numbers[4]))
    return out


@dataclass(frozen=True)
class EpochPlan:
    """One rank-independent plan of a training epoch for the current layout."""

    epoch: int
    layout: Layout
    done: tuple[Segment, ...]  # earlier segments, replayed
    sequence: np.ndarray  # ids not consumed by ``done``, in reading order
    num_batches: int  # batches per rank of the current segment over ``sequence``
    start: int  # batches per rank of the current segment already consumed
    samples_before: int  # global samples consumed by ``done``

    @property
    def segment(self) -> int:
        return len(self.done)

    def slot_ids(self, rank: int, slot: int) -> np.ndarray:
        """The sample ids worker slot ``slot`` of ``rank`` reads (in order) during this segment."""
        return self.sequence[slice(*_slot_ranges(len(self.sequence), self.layout, self.num_batches, rank)[slot])]

    def slot_tasks(self, index: SplitIndex, rank: int, slot: int) -> list[ShardTask]:
        return tasks_for(self.slot_ids(rank, slot), index)

    def position(self, consumed: int) -> dict:
        """The saved form of this epoch after each rank consumed ``consumed`` batches of this plan."""
        current = Segment(self.layout, self.start + consumed)
        samples = self.samples_before + current.batches * self.layout.global_batch
        return {"epoch": self.epoch, "samples": samples,
                "segments": [s.to_dict() for s in (*self.done, current)]}


def _slot_ranges(n: int, layout: Layout, num_batches: int, rank: int) -> list[tuple[int, int]]:
    a, b = rank_range(n, rank, layout.world_size)
    sizes = [q * layout.batch_size for q in worker_batch_counts(num_batches, layout.workers)]
    return [(a + x, a + y) for x, y in cut_by_sizes(b - a, sizes)]


def plan_epoch(index: SplitIndex, selected: np.ndarray | None, *, seed: int, epoch: int, layout: Layout,
               segments: list[Segment]) -> EpochPlan:
    """Plan a training epoch for ``layout`` after ``segments``; raise PositionError past the epoch's end."""
    sequence = epoch_sequence(index, selected, shuffle=True, seed=seed, epoch=epoch)
    if segments and segments[-1].layout == layout:
        done, start = tuple(segments[:-1]), segments[-1].batches  # same layout: go on in its order
    else:
        done, start = tuple(segments), 0
    samples_before = 0
    for number, segment in enumerate(done):
        sequence = _drop_consumed(sequence, segment, number, seed=seed, epoch=epoch)
        samples_before += segment.batches * segment.layout.global_batch
    num_batches = batches_per_rank(len(sequence), layout.batch_size, layout.world_size, layout.drop_last)
    if start > num_batches:
        raise PositionError(f"data position: {start} batches consumed, but the epoch has {num_batches}")
    return EpochPlan(epoch, layout, done, sequence, num_batches, start, samples_before)


def _drop_consumed(sequence: np.ndarray, segment: Segment, number: int, *, seed: int, epoch: int) -> np.ndarray:
    """Replay (ids only) what ``segment`` consumed and return the rest of ``sequence``, order kept."""
    layout = segment.layout
    num_batches = batches_per_rank(len(sequence), layout.batch_size, layout.world_size, layout.drop_last)
    if segment.batches > num_batches:
        raise PositionError(f"data position: a segment consumed {segment.batches} batches, "
                            f"but its epoch had {num_batches}")
    taken = worker_batch_counts(segment.batches, layout.workers)
    consumed: list[int] = []
    for rank in range(layout.world_size):
        for slot, (a, b) in enumerate(_slot_ranges(len(sequence), layout, num_batches, rank)):
            rng = slot_rng(seed, epoch, rank, slot, number)
            consumed.extend(islice(shuffle_buffer(sequence[a:b].tolist(), layout.shuffle_buffer, rng),
                                   taken[slot] * layout.batch_size))
    return sequence[np.isin(sequence, np.asarray(consumed, dtype=sequence.dtype), invert=True)]

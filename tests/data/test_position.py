"""Resume on another layout: a position in global samples, replayed on ids, leaves no repeat and no gap."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from cass_dist.data import build_loader
from cass_dist.data.position import PositionError
from cass_dist.data.synthetic import build_synthetic


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """168 train samples in 9 shards of 20 (the last one short)."""
    out = tmp_path_factory.mktemp("position") / "shards"
    build_synthetic(out, num_images=240, image_size=16, num_classes=3, shard_size=20, num_workers=0)
    return out


def train_keys(shards):
    return json.loads((shards / "index-train.json").read_text())["keys"]


def consume(shards, *, world_size, batch_size, workers, batches, start=0, epoch=2, buffer=16):
    """Every rank of a layout takes ``batches`` batches (None: the rest of the epoch); return keys, position."""
    keys, position = [], None
    for rank in range(world_size):
        loader = build_loader(shards, "train", batch_size=batch_size, train=True, rank=rank, world_size=world_size,
                              num_workers=workers, seed=3, epoch=epoch, start_batch=start, shuffle_buffer=buffer)
        taken = list(itertools.islice(iter(loader), batches))
        keys += [k for batch in taken for k in batch["key"]]
        position = loader.position(len(taken))
    return keys, position


@pytest.mark.parametrize("first,second", [
    ((2, 4, 2), (1, 8, 0)),   # 2 ranks x 4 -> 1 rank x 8: the requeue on half the GPUs
    ((1, 8, 1), (4, 2, 2)),   # and the other way round, with other worker counts
    ((3, 4, 1), (2, 6, 2)),   # another global batch altogether
])
def test_a_resume_on_another_layout_repeats_and_skips_nothing(shards, first, second):
    world, batch, workers = first
    before, position = consume(shards, world_size=world, batch_size=batch, workers=workers, batches=5)
    assert position["samples"] == 5 * world * batch
    world2, batch2, workers2 = second
    after, end = consume(shards, world_size=world2, batch_size=batch2, workers=workers2, batches=None, start=position)
    seen = before + after
    assert max(Counter(seen).values()) == 1  # no sample twice ...
    assert set(seen) <= set(train_keys(shards))
    # ... and no gap beyond the remainder a global batch cannot take
    assert len(train_keys(shards)) - len(seen) < world2 * batch2
    assert end["samples"] == len(seen) and [s["batches"] for s in end["segments"]] == [5, len(after) // (world2 * batch2)]


def test_chained_layout_changes_in_one_epoch_stay_exact(shards):
    a, position = consume(shards, world_size=2, batch_size=4, workers=2, batches=3)
    b, position = consume(shards, world_size=1, batch_size=8, workers=1, batches=4, start=position)
    c, end = consume(shards, world_size=4, batch_size=2, workers=0, batches=None, start=position)
    seen = a + b + c
    assert len(seen) == len(set(seen)) and len(train_keys(shards)) - len(seen) < 8
    assert len(end["segments"]) == 3


def test_the_same_layout_resumes_in_the_straight_runs_order(shards):
    straight, _ = consume(shards, world_size=2, batch_size=4, workers=2, batches=None)
    first, position = consume(shards, world_size=2, batch_size=4, workers=2, batches=6)
    rest, _ = consume(shards, world_size=2, batch_size=4, workers=2, batches=None, start=position)
    per_rank = len(straight) // 2
    # rank by rank: the resumed loader yields exactly the straight run's tail
    assert first[:24] + rest[:per_rank - 24] == straight[:per_rank]
    assert sorted(first + rest) == sorted(straight)


def test_a_plain_batch_count_still_resumes_the_same_layout(shards):
    _, position = consume(shards, world_size=1, batch_size=8, workers=0, batches=4)
    by_position, _ = consume(shards, world_size=1, batch_size=8, workers=0, batches=None, start=position)
    by_count, _ = consume(shards, world_size=1, batch_size=8, workers=0, batches=None, start=4)
    assert by_position == by_count


def test_positions_that_do_not_fit_are_refused(shards):
    _, position = consume(shards, world_size=1, batch_size=8, workers=0, batches=2)
    with pytest.raises(PositionError, match="epoch 2"):
        build_loader(shards, "train", batch_size=8, train=True, seed=3, epoch=3, start_batch=position)
    with pytest.raises(PositionError, match="malformed segment"):
        build_loader(shards, "train", batch_size=8, train=True, seed=3, epoch=2,
                     start_batch={"epoch": 2, "segments": [{"world_size": 1}]})
    with pytest.raises(PositionError, match="batches consumed"):
        build_loader(shards, "train", batch_size=8, train=True, seed=3, epoch=2, start_batch=999)

"""Accelerate must not shard our loader a second time.

The engine builds one ShardLoader per rank (rank=accelerator.process_index,
world_size=accelerator.num_processes) and iterates it directly, moving batches to the device itself.
These tests simulate two ranks in one process: the ShardLoader passes through ``prepare`` untouched
and the two ranks cover the split exactly, whereas a torch DataLoader over the same stream handed to
Accelerate 1.x gets wrapped in ``IterableDatasetShard`` and loses half of each rank's share (or, with
the worker-batched ``batch_size=None`` loader, cannot be prepared at all).
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader, IterableDataset

from cass_dist.data import build_loader
from cass_dist.data.stream import sum_across_ranks
from cass_dist.data.synthetic import build_synthetic

WORLD = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate") / "shards"
    build_synthetic(out, num_images=120, image_size=16, num_classes=3, shard_size=10, num_workers=0)
    return out


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)  # leave no singleton state behind for other tests


def expected_keys(shards, split):
    return sorted(json.loads((shards / f"index-{split}.json").read_text())["keys"])


class Unbatched(IterableDataset):
    """Our worker-batched stream flattened back to samples: what a 'classic' iterable loader looks like."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            yield from ({"key": key, "label": label} for key, label in zip(batch["key"], batch["label"]))


@pytest.mark.parametrize("train", [False, True])
def test_prepare_leaves_the_shard_loader_alone_and_ranks_cover_the_split(shards, accelerator, train):
    per_rank = []
    for rank in range(WORLD):
        loader = build_loader(shards, "train", batch_size=4, train=train, rank=rank, world_size=WORLD,
                              num_workers=2)
        prepared = accelerator.prepare(loader)
        assert prepared is loader
        per_rank.append({k for batch in prepared for k in batch["key"]})
    assert not per_rank[0] & per_rank[1]
    union = sorted(per_rank[0] | per_rank[1])
    if train:  # an epoch drops the remainder of N / (batch_size * world_size) only
        assert len(union) == len(expected_keys(shards, "train")) // (4 * WORLD) * 4 * WORLD
    else:
        assert union == expected_keys(shards, "train")


def test_preparing_a_torch_loader_over_the_stream_shards_it_twice(shards, accelerator):
    seen = []
    for rank in range(WORLD):
        stream = build_loader(shards, "train", batch_size=4, train=False, rank=rank, world_size=WORLD).dataset
        torch_loader = DataLoader(Unbatched(stream), batch_size=4)
        prepared = prepare_data_loader(torch_loader, num_processes=WORLD, process_index=rank,
                                       put_on_device=False, dispatch_batches=False)
        seen.extend(k for batch in prepared for k in batch["key"])
    expected = expected_keys(shards, "train")
    # Each rank keeps only its "process slice" of its own, already-sharded samples: about half is lost
    # (84 samples: each rank's 42 become 5 full groups of 8, of which it keeps 4, plus one padded tail).
    assert set(seen) < set(expected)
    assert len(set(seen)) <= 0.6 * len(expected)


def test_the_worker_batched_torch_loader_cannot_be_prepared(shards, accelerator):
    stream = build_loader(shards, "test", batch_size=4, train=False, rank=0, world_size=WORLD).dataset
    prepared = prepare_data_loader(DataLoader(stream, batch_size=None), num_processes=WORLD, process_index=0,
                                   put_on_device=False, dispatch_batches=False)
    with pytest.raises(TypeError):  # IterableDatasetShard multiplies the loader's batch_size (None)
        next(iter(prepared))


class TwoRanks:
    """Stand-in for a 2-process Accelerator whose other rank skipped ``other`` samples."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other: int):
        self.other = other

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.other


def test_skip_counts_are_summed_over_ranks(accelerator):
    assert sum_across_ranks(3, None) == 3
    assert sum_across_ranks(3, accelerator) == 3  # one process: nothing to add
    assert sum_across_ranks(3, TwoRanks(other=4)) == 7

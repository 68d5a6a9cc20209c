"""Objectives with batch statistics use the global batch: 2 gloo ranks under DDP give the loss and the
gradients of one process on both ranks' rows (with ``gather``, the default), and not without it."""

from __future__ import annotations

import pytest
import torch

from cass_dist.losses.cass import OBJECTIVES, build_objective
from tests.distributed import _workers as workers
from tests.distributed._ranks import run_ranks

NAMES = ["vicreg", "barlow", "paper"]


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(workers.objective_gradients, NAMES)


def single_process(name):
    net = workers.embedder()
    z_cnn, z_vit = net(workers.global_inputs()).chunk(2, dim=1)
    out = build_objective(name, embed_dim=4)(z_cnn, z_vit)
    out["loss"].backward()
    return out["loss"].detach(), [p.grad for p in net.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_with_gather_equal_one_process_on_the_global_batch(ranks, name):
    loss, grads = single_process(name)
    # per-sample terms are local, so a rank's loss is its share; the mean over ranks is the global loss
    torch.testing.assert_close(sum(r[name, True]["loss"] for r in ranks) / len(ranks), loss)
    for rank in ranks:
        for got, expected in zip(rank[name, True]["grads"], grads):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vicreg", "barlow"])
def test_without_gather_batch_statistics_are_per_rank_and_the_gradients_differ(ranks, name):
    assert OBJECTIVES[name].uses_batch_statistics
    _, grads = single_process(name)
    assert any(not torch.allclose(got, expected, rtol=1e-3, atol=1e-4)
               for got, expected in zip(ranks[0][name, False]["grads"], grads))


def test_paper_is_per_sample_so_gather_changes_nothing(ranks):
    assert not OBJECTIVES["paper"].uses_batch_statistics
    for rank in ranks:
        for a, b in zip(rank["paper", True]["grads"], rank["paper", False]["grads"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name, gathers", [("vicreg", [(4, 8)]), ("barlow", [(4, 8)]), ("paper", [])])
def test_at_most_one_all_gather_per_objective_call(ranks, name, gathers):
    """Both branches' [B, D] embeddings travel in one [B, 2D] all-gather; none without gather."""
    for rank in ranks:
        assert rank[name, True]["gathers"] == gathers and rank[name, False]["gathers"] == []

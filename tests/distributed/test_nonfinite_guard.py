"""The non-finite guard of ``optimizer_step`` under DDP (2 gloo ranks, Accelerate, accumulation 2): a NaN
loss on rank 1 only makes EVERY rank skip the whole window, exactly as if that window never happened,
with one DDP all-reduce per window on every rank; an fp16 GradScaler stays consistent."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import _workers as workers
from tests.distributed._ranks import run_ranks

# window 1: NaN in the first micro-batch (before the no_sync backward); window 2: in the last one.
NAN = {(1, 0): "nan", (2, 1): "nan"}


def reference(trained_windows) -> list[torch.Tensor]:
    """One process, no DDP: AdamW steps only on ``trained_windows``, each on the mean over all its rows."""
    model = workers.guard_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for w in trained_windows:
        rows = torch.cat([workers.guard_batch(w, m, r) for m in range(workers.ACCUM) for r in range(2)])
        workers.guard_loss(model, rows).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()]


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(workers.guard_steps, NAN, False)


def test_every_rank_skips_a_window_in_which_one_rank_saw_a_nan(ranks):
    for records in ranks:
        assert [r["finite"] for r in records] == [True, False, False, True, True]
        assert [r["loss_sum"] == 0 for r in records] == [False, True, True, False, False]
        assert not any(r["overflow"] for r in records)  # no loss scaler here
    for w in range(workers.WINDOWS):  # weights equal on both ranks after every window
        for a, b in zip(ranks[0][w]["params"], ranks[1][w]["params"]):
            assert torch.equal(a, b), w


def test_a_skipped_window_is_a_window_that_never_happened_and_the_next_one_trains(ranks):
    params = [r["params"] for r in ranks[0]]
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[2]))  # windows 1-2 changed nothing
    assert not torch.equal(params[2][0], params[3][0])  # window 3 trains
    for got, expected in zip(params[4], reference([0, 3, 4])):  # Adam's step count untouched by the skips
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_one_gradient_all_reduce_per_window_on_every_rank(ranks):
    """Every rank runs every backward, so DDP's reducer never waits for, or pairs across, a skipped one."""
    for records in ranks:
        assert [r["reductions"] for r in records] == [1, 2, 3, 4, 5]


def test_a_stop_request_on_one_rank_rides_in_the_same_collective(ranks):
    for records in ranks:
        assert [r["stop"] for r in records] == [False, False, False, True, False]


def test_fp16_grad_scaler_stays_consistent_across_skipped_and_overflowing_windows():
    # window 4: a finite loss whose scaled gradients overflow: the GradScaler's own skip, scale halved
    records = run_ranks(workers.guard_steps, {**NAN, (4, 0): "huge"}, True)
    for rank in records:
        assert [r["finite"] for r in rank] == [True, False, False, True, True]
        assert [r["scale"] for r in rank] == [1024.0, 1024.0, 1024.0, 1024.0, 512.0]
        assert [r["overflow"] for r in rank] == [False, False, False, False, True]  # the scaler's skip, told apart
        assert all(torch.equal(a, b) for a, b in zip(rank[3]["params"], rank[4]["params"]))
    for got, expected in zip(records[0][4]["params"], reference([0, 3])):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(records[0][4]["params"], records[1][4]["params"]):
        assert torch.equal(a, b)

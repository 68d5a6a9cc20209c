"""Functions that run on each gloo rank (tests/distributed/_ranks.py). Kept light: a spawned rank imports
this module, and every import costs seconds on a loaded 2-core machine."""

from __future__ import annotations

import torch

from cass_dist.utils.distributed import agree_any, any_rank, gather_with_grad


def rank_rows(rank: int) -> torch.Tensor:
    return torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * rank


def utilities(rank: int, world: int) -> dict:
    """The gather (values, gradient), the flag agreement and torch's SyncBatchNorm on CPU, on this rank."""
    x = rank_rows(rank).requires_grad_(True)
    gathered = gather_with_grad(x)
    loss = (gathered.pow(2).sum(0) * torch.tensor([1.0, 3.0])).sum()  # the same loss on every rank
    loss.backward()
    mine = torch.tensor([float(rank == 1), float(rank == 0), 0.0])
    result = {"gathered": gathered.detach(), "grad": x.grad, "agreed": any_rank(mine), "mine": mine,
              "one_said_yes": agree_any(rank == 1), "none_said_yes": agree_any(False), "cpu_syncbn": ""}
    try:
        torch.nn.SyncBatchNorm(4)(torch.randn(8, 4))
    except ValueError as exc:
        result["cpu_syncbn"] = str(exc)
    result["reductions_after_a_skipped_backward"] = reductions_after_a_skipped_backward(world)
    return result


def reductions_after_a_skipped_backward(world: int) -> int:
    """DDP all-reduces during a no_sync backward that follows a synced forward whose backward was skipped."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(torch.nn.Linear(2, 1))
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future().then(
            lambda fut: fut.value()[0] / world)

    ddp.register_comm_hook(None, counting_hook)
    x = torch.ones(4, 2)
    ddp(x).sum()  # a synced forward (the last micro-batch of a window) whose backward is skipped
    with ddp.no_sync():  # the first micro-batch of the next window: should accumulate locally
        ddp(x).sum().backward()
    return len(calls)


def global_inputs() -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(0))


def embedder() -> torch.nn.Linear:
    """A tiny stand-in for the CASS pair: one linear map to [z_cnn | z_vit], 4 dimensions each."""
    torch.manual_seed(0)
    return torch.nn.Linear(6, 8)


def objective_gradients(rank: int, world: int, names: list[str]) -> dict:
    """Each objective's loss and DDP-averaged parameter gradients on this rank's rows, gather on and off."""
    from torch.nn.parallel import DistributedDataParallel

    from cass_dist.losses import cass

    gathers = []

    def counted_gather(tensor):
        gathers.append(tuple(tensor.shape))
        return gather_with_grad(tensor)

    cass.gather_with_grad = counted_gather  # this rank's process only
    rows = global_inputs().chunk(world)[rank]
    results = {}
    for name in names:
        for gather in (True, False):
            net = embedder()
            ddp = DistributedDataParallel(net)  # kept alive until backward: its reducer averages the gradients
            z_cnn, z_vit = ddp(rows).chunk(2, dim=1)
            gathers.clear()
            out = cass.build_objective(name, embed_dim=4, gather=gather)(z_cnn, z_vit)
            out["loss"].backward()
            results[name, gather] = {"loss": out["loss"].detach(), "grads": [p.grad for p in net.parameters()],
                                     "gathers": list(gathers)}
    return results


# ----------------------------------------------------------------------------- the non-finite guard
ACCUM = 2
WINDOWS = 5


def guard_batch(window: int, micro: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(1000 * window + 10 * micro + rank))


def guard_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def guard_loss(model, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 1.0).pow(2).mean()


def guard_steps(rank: int, world: int, poison: dict, with_scaler: bool) -> list[dict]:
    """Run WINDOWS windows of ACCUM micro-batches through ``optimizer_step`` under DDP (Accelerate, gloo).

    ``poison`` maps (window, micro-batch) to what happens to rank 1's loss there: "nan", or "huge"
    (finite, but its scaled gradients overflow fp16's range). Rank 0 asks to stop in window 3.
    ``with_scaler``: a GradScaler attached the way Accelerate attaches one on CUDA with fp16 (it gives
    CPU none). Returns, per window, what the step said, the parameters, the DDP all-reduces so far and
    the scaler's scale.
    """
    from accelerate import Accelerator

    from cass_dist.engine.step import optimizer_step

    acc = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    assert acc.num_processes == world
    if with_scaler:
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    net = guard_model()
    model, optimizer = acc.prepare(net, torch.optim.AdamW(net.parameters(), lr=0.05))
    if with_scaler:  # after prepare: no fp16 autocast on CPU, but clipping unscales as on CUDA
        acc.native_amp, acc.state._mixed_precision = True, "fp16"
    reductions = []

    def counting_hook(state, bucket):
        reductions.append(1)
        return torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future().then(
            lambda fut: fut.value()[0] / world)

    model.register_comm_hook(None, counting_hook)

    def forward(batch):
        loss = guard_loss(model, batch["x"])
        kind = batch["poison"]
        return {"loss": loss * float("nan") if kind == "nan" else loss * 1e36 if kind == "huge" else loss}

    records = []
    for w in range(WINDOWS):
        window = [{"x": guard_batch(w, m, rank), "poison": poison.get((w, m)) if rank == 1 else None}
                  for m in range(ACCUM)]
        outcome = optimizer_step(acc, model, optimizer, window, forward, clip_grad=1.0,
                                 stop_requested=rank == 0 and w == 3)
        records.append({"finite": outcome.finite, "stop": outcome.stop, "loss_sum": float(outcome.loss_sum),
                        "overflow": outcome.overflow,
                        "params": [p.detach().clone() for p in model.parameters()],
                        "reductions": len(reductions),
                        "scale": acc.scaler.get_scale() if with_scaler else None})
    return records

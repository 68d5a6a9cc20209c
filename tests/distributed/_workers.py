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
    return result


def global_inputs() -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(0))


def embedder() -> torch.nn.Linear:
    """A tiny stand-in for the CASS pair: one linear map to [z_cnn | z_vit], 4 dimensions each."""
    torch.manual_seed(0)
    return torch.nn.Linear(6, 8)


def objective_gradients(rank: int, world: int, names: list[str]) -> dict:
    """Each objective's loss and DDP-averaged parameter gradients on this rank's rows, gather on and off."""
    from torch.nn.parallel import DistributedDataParallel

    from cass_dist.losses.cass import build_objective

    rows = global_inputs().chunk(world)[rank]
    results = {}
    for name in names:
        for gather in (True, False):
            net = embedder()
            ddp = DistributedDataParallel(net)  # kept alive until backward: its reducer averages the gradients
            z_cnn, z_vit = ddp(rows).chunk(2, dim=1)
            out = build_objective(name, embed_dim=4, gather=gather)(z_cnn, z_vit)
            out["loss"].backward()
            results[name, gather] = {"loss": out["loss"].detach(), "grads": [p.grad for p in net.parameters()]}
    return results

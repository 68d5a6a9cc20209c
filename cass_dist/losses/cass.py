"""CASS objectives: the paper's loss and the candidates that keep it from collapsing.

Every objective is an ``nn.Module`` whose ``forward(z_cnn, z_vit)`` returns ``dict(loss=<fp32 scalar>,
<term>=<detached fp32 scalar>, ...)``, computed in fp32 with autocast off whatever the caller's precision
(a bf16 covariance of 1000-d embeddings loses the small off-diagonal terms it penalises). Objectives with
parameters (a predictor) say which branch each parameter serves through ``branch_parameters()``, so the
optimizer gives it that branch's lr.

Batch statistics are global: an objective that sets ``uses_batch_statistics`` (vicreg, barlow) computes
them on ``global_batch(...)``, every rank's rows gathered with gradient (``gather=True``, the default;
``objective.gather`` in the config), as the official VICReg and Barlow Twins code do. Per-sample terms
stay on the local rows: DDP's gradient average already makes them the global-batch mean. With
``gather=False`` each rank uses its own micro-batch, so the objective changes with the world size.

Candidates (``build_objective(name, embed_dim=...)``):

- ``paper``: the batch mean of 2 - 2cos(z_cnn, z_vit), no stop-gradient (Singh & Cirrone). Collapses
  from scratch within ~20 steps (docs/objectives.md).
- ``vicreg`` (the default, with ``CASS(head="mlp")``): paper + VICReg variance and covariance terms on each branch. They act on the standardised
  embeddings s = sqrt(d) * z / ||z||, for which the paper term is exactly VICReg's invariance MSE, so
  VICReg's 25/25/1 weights map to sim 1, var 1, cov 0.04; a healthy s has per-dimension std ~1.
- ``barlow``: Barlow Twins cross-correlation between the CNN's and the ViT's batch-standardised
  embeddings (diagonal to 1, off-diagonal to 0).
- ``simsiam``: a predictor MLP per branch and stop-gradient on the target branch, with the paper's
  2 - 2cos as the distance.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cass_dist.configs.base import ConfigError
from cass_dist.utils.distributed import gather_with_grad, world_size

BRANCHES = ("cnn", "vit")


def cass_loss(z_cnn: torch.Tensor, z_vit: torch.Tensor) -> torch.Tensor:
    """Return the paper's loss: the batch mean of 2 - 2cos(z_cnn, z_vit), in fp32, gradients to both.

    Raises ValueError when the two embeddings are not both ``[B, D]`` with the same shape.
    """
    _check_pair(z_cnn, z_vit)
    return (2.0 - 2.0 * F.cosine_similarity(z_cnn.float(), z_vit.float(), dim=-1, eps=1e-8)).mean()


def variance_term(s: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """Return VICReg's variance hinge: mean over dimensions of relu(gamma - std over the batch)."""
    std = torch.sqrt(s.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_term(s: torch.Tensor) -> torch.Tensor:
    """Return VICReg's covariance term: the sum of squared off-diagonal covariances, divided by D."""
    n, d = s.shape
    centred = s - s.mean(dim=0)
    cov = centred.T @ centred / max(n - 1, 1)
    return _off_diagonal(cov).pow(2).sum() / d


def standardise(z: torch.Tensor) -> torch.Tensor:
    """Return sqrt(D) * z / ||z|| in fp32: unit-scale dimensions whose per-dimension std is ~1 when healthy."""
    z = z.float()
    return math.sqrt(z.shape[-1]) * F.normalize(z, dim=-1, eps=1e-8)


class Objective(nn.Module):
    """Base class: ``forward(z_cnn, z_vit) -> dict(loss=..., <terms>)``; no parameters by default.

    ``forward`` checks the pair, turns autocast off and hands fp32 copies to ``compute``, which each
    objective implements. One with batch statistics sets ``uses_batch_statistics`` and computes them
    on ``self.global_batch(...)``.
    """

    uses_batch_statistics = False  # True: some term is a statistic over the batch (gathered across ranks)

    def __init__(self, *, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def forward(self, z_cnn: torch.Tensor, z_vit: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_pair(z_cnn, z_vit)
        with torch.autocast(device_type=z_cnn.device.type, enabled=False):
            return self.compute(z_cnn.float(), z_vit.float())

    def compute(self, z_cnn: torch.Tensor, z_vit: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the loss dict from fp32 embeddings (autocast is off here)."""
        raise NotImplementedError

    def global_batch(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return ``tensors`` ([B, D_i] each) with every rank's rows, in ONE all-gather with gradient.

        Unchanged on one process or with ``gather=False``.
        """
        if not self.gather or world_size() == 1:
            return tensors
        widths = [t.shape[1] for t in tensors]
        return tuple(gather_with_grad(torch.cat(tensors, dim=1)).split(widths, dim=1))

    def branch_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Return this objective's named parameters grouped by the branch ("cnn" / "vit") they serve."""
        return {branch: [] for branch in BRANCHES}


class PaperObjective(Objective):
    """The paper: 2 - 2cos between the branches, both updated, nothing against collapse."""

    def compute(self, z_cnn: torch.Tensor, z_vit: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = cass_loss(z_cnn, z_vit)
        return {"loss": loss, "loss_cos": loss.detach()}


class VICRegObjective(Objective):
    """The paper loss plus VICReg variance/covariance on each branch's standardised embeddings.

    The paper term is per sample (local rows); variance and covariance use the global batch.
    """

    uses_batch_statistics = True

    def __init__(self, *, sim_weight: float = 1.0, var_weight: float = 1.0, cov_weight: float = 0.04,
                 gather: bool = True) -> None:
        super().__init__(gather=gather)
        self.sim_weight, self.var_weight, self.cov_weight = sim_weight, var_weight, cov_weight

    def compute(self, z_cnn: torch.Tensor, z_vit: torch.Tensor) -> dict[str, torch.Tensor]:
        sim = cass_loss(z_cnn, z_vit)
        s_cnn, s_vit = self.global_batch(standardise(z_cnn), standardise(z_vit))
        var = variance_term(s_cnn) + variance_term(s_vit)
        cov = covariance_term(s_cnn) + covariance_term(s_vit)
        loss = self.sim_weight * sim + self.var_weight * var + self.cov_weight * cov
        return {"loss": loss, "loss_cos": sim.detach(), "loss_var": var.detach(), "loss_cov": cov.detach()}


class BarlowObjective(Objective):
    """Barlow Twins between architectures: the CNN/ViT cross-correlation matrix pulled to the identity.

    Standardisation and correlation use the global batch. The loss is divided by D so its size does
    not grow with the embedding dimension.
    """

    uses_batch_statistics = True

    def __init__(self, *, lambd: float = 5e-3, gather: bool = True) -> None:
        super().__init__(gather=gather)
        self.lambd = lambd

    def compute(self, z_cnn: torch.Tensor, z_vit: torch.Tensor) -> dict[str, torch.Tensor]:
        all_cnn, all_vit = self.global_batch(z_cnn, z_vit)
        n, d = all_cnn.shape
        a, b = _batch_standardise(all_cnn), _batch_standardise(all_vit)
        corr = a.T @ b / n
        on_diag = (torch.diagonal(corr) - 1.0).pow(2).sum() / d
        off_diag = _off_diagonal(corr).pow(2).sum() / d
        loss = on_diag + self.lambd * off_diag
        return {
            "loss": loss,
            "loss_on_diag": on_diag.detach(),
            "loss_off_diag": off_diag.detach(),
            "loss_cos": cass_loss(z_cnn.detach(), z_vit.detach()),
        }


class SimSiamObjective(Objective):
    """SimSiam across architectures: each branch predicts the other's (stop-gradient) embedding."""

    def __init__(self, *, embed_dim: int, pred_hidden_dim: int | None = None, gather: bool = True) -> None:
        super().__init__(gather=gather)  # per-sample terms only (its predictors' BatchNorm syncs with sync_bn)
        hidden = pred_hidden_dim or max(embed_dim // 4, 16)
        self.predictor_cnn = predictor(embed_dim, hidden)
        self.predictor_vit = predictor(embed_dim, hidden)

    def compute(self, z_cnn: torch.Tensor, z_vit: torch.Tensor) -> dict[str, torch.Tensor]:
        p_cnn, p_vit = self.predictor_cnn(z_cnn), self.predictor_vit(z_vit)
        loss = 0.5 * (cass_loss(p_cnn, z_vit.detach()) + cass_loss(p_vit, z_cnn.detach()))
        return {"loss": loss, "loss_cos": cass_loss(z_cnn.detach(), z_vit.detach())}

    def branch_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        return {
            "cnn": [(f"predictor_cnn.{n}", p) for n, p in self.predictor_cnn.named_parameters()],
            "vit": [(f"predictor_vit.{n}", p) for n, p in self.predictor_vit.named_parameters()],
        }


def predictor(dim: int, hidden_dim: int) -> nn.Sequential:
    """Return SimSiam's bottleneck predictor MLP: Linear-BN-ReLU-Linear, ``dim`` -> ``dim``."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )


OBJECTIVES: dict[str, type[Objective]] = {
    "paper": PaperObjective,
    "vicreg": VICRegObjective,
    "barlow": BarlowObjective,
    "simsiam": SimSiamObjective,
}
# Chosen by benchmarks/objectives.py (docs/objectives.md), together with CASS(head="mlp") projector heads.
DEFAULT_OBJECTIVE = "vicreg"


def build_objective(name: str, *, embed_dim: int, gather: bool = True, **kwargs: float) -> Objective:
    """Return the objective called ``name`` (one of ``OBJECTIVES``), built with its ``kwargs``.

    ``gather``: batch statistics over every rank's rows (True) or this rank's only (False).
    Raises ConfigError (a ValueError) for an unknown name or a keyword that objective does not take.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    kwargs = {**kwargs, "gather": gather}
    if cls is SimSiamObjective:
        kwargs = {"embed_dim": embed_dim, **kwargs}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"objective.kwargs: objective {name!r} does not take keywords {sorted(kwargs)}: {err}") from err


def _check_pair(z_cnn: torch.Tensor, z_vit: torch.Tensor) -> None:
    if z_cnn.ndim != 2 or z_cnn.shape != z_vit.shape:
        raise ValueError(
            f"CASS objectives need z_cnn and z_vit of the same shape [B, D], got "
            f"{tuple(z_cnn.shape)} and {tuple(z_vit.shape)}"
        )


def _batch_standardise(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(dim=0)) / (z.std(dim=0) + 1e-5)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    return m - torch.diag_embed(torch.diagonal(m))

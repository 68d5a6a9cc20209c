"""Collapse monitor: cheap statistics of an embedding batch, and a warning when a branch collapses.

For ``B`` embeddings of dimension ``D``, l2-normalised:

- ``std``: the per-dimension std over the batch, averaged over dimensions. About 1/sqrt(D) when the
  embeddings spread over the sphere, 0 when they all point the same way.
- ``eff_rank``: exp(entropy of the normalised singular values) of the (uncentred) batch (RankMe,
  Garrido et al. 2023); between 1 (one direction) and min(B, D).
- ``offdiag_cos``: the mean cosine between two different samples; near 1 when collapsed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@torch.no_grad()
def embedding_stats(z: torch.Tensor) -> dict[str, float]:
    """Return ``dict(std, eff_rank, offdiag_cos, dim)`` of the embedding batch ``z`` [B, D] (computed in fp32).

    Raises ValueError when ``z`` is not 2-D with at least two samples.
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"embedding_stats needs a [B, D] batch with B >= 2, got shape {tuple(z.shape)}")
    u = F.normalize(z.detach().float(), dim=-1, eps=1e-8)
    n, d = u.shape
    std = u.std(dim=0).mean()
    singular = torch.linalg.svdvals(u)
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    gram = u @ u.T
    offdiag_cos = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    return {"std": float(std), "eff_rank": float(torch.exp(entropy)), "offdiag_cos": float(offdiag_cos), "dim": d}


@dataclass
class CollapseMonitor:
    """Warns when a branch's embeddings collapse: std below ``std_fraction / sqrt(D)`` or rank below ``min_eff_rank``.

    ``update`` returns a warning on the step a branch enters collapse (not again while it stays
    collapsed, so logs are not flooded) and None otherwise; ``collapsed`` holds the current state.
    """

    std_fraction: float = 0.1
    min_eff_rank: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.std_fraction < 1:
            raise ValueError(f"CollapseMonitor.std_fraction must be in (0, 1), got {self.std_fraction}")
        if self.min_eff_rank < 1:
            raise ValueError(f"CollapseMonitor.min_eff_rank must be >= 1, got {self.min_eff_rank}")
        self.collapsed: dict[str, bool] = {"cnn": False, "vit": False}

    def is_collapsed(self, stats: dict[str, float]) -> bool:
        """Return True when the statistics from :func:`embedding_stats` show a collapsed batch."""
        healthy_std = 1.0 / math.sqrt(stats["dim"])
        return stats["std"] < self.std_fraction * healthy_std or stats["eff_rank"] < self.min_eff_rank

    def update(self, stats_cnn: dict[str, float], stats_vit: dict[str, float]) -> str | None:
        """Return a warning naming the branches that just collapsed, or None."""
        return self.check({"cnn": stats_cnn, "vit": stats_vit})

    def check(self, stats_by_branch: dict[str, dict[str, float]]) -> str | None:
        """Like ``update`` for any set of branches (a one-backbone method such as DINO has one)."""
        newly = []
        for branch, stats in stats_by_branch.items():
            now = self.is_collapsed(stats)
            if now and not self.collapsed.get(branch, False):
                newly.append(
                    f"{branch} (std {stats['std']:.2g} vs healthy {1 / math.sqrt(stats['dim']):.2g}, "
                    f"effective rank {stats['eff_rank']:.2f})"
                )
            self.collapsed[branch] = now
        if not newly:
            return None
        return "embedding collapse: " + "; ".join(newly) + " - the objective is not preventing collapse"

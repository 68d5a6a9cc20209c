"""CASSPretrainer: the CASS pair and its objective as ONE module, so DDP/FSDP/DeepSpeed wrap one thing."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from cass_dist.losses.cass import BRANCHES, Objective
from cass_dist.models.cass import CASS


class CASSPretrainer(nn.Module):
    """``forward(images) -> dict(loss=fp32 scalar, z_cnn, z_vit, <detached loss terms>)``."""

    def __init__(self, model: CASS, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, images: torch.Tensor, vit_images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Return the objective's dict (``loss`` plus its terms) with the embeddings ``z_cnn`` and ``z_vit``.

        ``vit_images``: the ViT's own view of the same images (default: ``images``, as in the paper).
        """
        z_cnn, z_vit = self.model(images, vit_images)
        out = self.objective(z_cnn, z_vit)
        return {**out, "z_cnn": z_cnn, "z_vit": z_vit}

    def branch_named_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Return every trainable parameter, by branch: backbone, head, and objective parameters it serves."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for branch in BRANCHES:
            named = [(f"model.{branch}.{n}", p) for n, p in getattr(self.model, branch).named_parameters()]
            named += [(f"model.{branch}_head.{n}", p) for n, p in getattr(self.model, f"{branch}_head").named_parameters()]
            named += [(f"objective.{n}", p) for n, p in self.objective.branch_parameters()[branch]]
            groups[branch] = [(n, p) for n, p in named if p.requires_grad]
        return groups

    def param_groups(
        self, *, lr_cnn: float, lr_vit: float, weight_decay_cnn: float, weight_decay_vit: float
    ) -> list[dict[str, Any]]:
        """Return optimizer parameter groups: per branch, one with weight decay and one without.

        Every group carries ``name`` ("cnn" or "vit", for per-branch lr logging) and ``no_decay``. Norms,
        biases, and what timm lists in ``no_weight_decay()`` (position embeddings, class token) get
        weight decay 0. Raises ValueError when a trainable parameter belongs to no branch or to two.
        """
        settings = {"cnn": (lr_cnn, weight_decay_cnn), "vit": (lr_vit, weight_decay_vit)}
        by_branch = self.branch_named_parameters()
        self._check_coverage(by_branch)
        groups: list[dict[str, Any]] = []
        for branch, named in by_branch.items():
            lr, wd = settings[branch]
            skip = _no_weight_decay_names(getattr(self.model, branch), prefix=f"model.{branch}.")
            decay = [p for n, p in named if p.ndim > 1 and n not in skip]
            no_decay = [p for n, p in named if p.ndim <= 1 or n in skip]
            for params, weight_decay, flag in ((decay, wd, False), (no_decay, 0.0, True)):
                if params:
                    groups.append(
                        {"params": params, "lr": lr, "weight_decay": weight_decay, "name": branch, "no_decay": flag}
                    )
        return groups

    def _check_coverage(self, by_branch: dict[str, list[tuple[str, nn.Parameter]]]) -> None:
        seen: dict[int, str] = {}
        for branch, named in by_branch.items():
            for name, p in named:
                if id(p) in seen:
                    raise ValueError(f"parameter {name} is in both the {seen[id(p)]} and the {branch} branch")
                seen[id(p)] = branch
        orphans = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in seen]
        if orphans:
            raise ValueError(f"parameters in no branch (objective.branch_parameters() misses them): {orphans}")


def _no_weight_decay_names(backbone: nn.Module, *, prefix: str) -> set[str]:
    names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
    return {prefix + n for n in names}

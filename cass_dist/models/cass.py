"""CASS: a CNN and a ViT (both timm) fed the same images, each ending in a head to a shared embedding space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cass_dist.models.backbones import (
    BackboneSpec,
    build_from_spec,
    plan_backbone,
    pooled_features,
    set_grad_checkpointing,
)

HEADS = ("linear", "mlp")
BranchSpec = BackboneSpec  # how one branch's timm backbone is built (the name predates BackboneSpec)


class CASS(nn.Module):
    """The CASS pair: ``forward(images) -> (z_cnn, z_vit)``, both ``[B, embed_dim]``.

    ``head="linear"`` reproduces the paper: the timm classifier itself outputs ``embed_dim`` values
    (1000 by default, the ImageNet head). ``head="mlp"`` strips the classifier and adds a projector MLP
    with BatchNorm (Linear-BN-ReLU-Linear-BN-ReLU-Linear) per branch; then the timm backbones have no
    classifier and export as pure feature extractors.

    ``img_size`` / ``vit_patch_size`` go to the ViT so it works on small images (e.g. 32 px with patch
    4 gives 64 tokens instead of 4); ``vit_patch_size`` None picks one with at least 16 tokens.
    ``small_stem`` None gives the CNN a stride-1 3x3 stem without max-pool at ``img_size <= 64``
    (``cass_dist.models.small_images``); True / False force it. Weights: ``pretrained`` uses the hub or ``cache_dir``;
    ``cnn_pretrained_file`` / ``vit_pretrained_file`` load local files.

    Raises ``BackboneError`` / ``WeightsUnavailableError`` (from :mod:`cass_dist.models.backbones`) and
    ``ValueError`` for an unknown head or a non-positive embedding size.
    """

    def __init__(
        self,
        cnn: str = "resnet50",
        vit: str = "vit_base_patch16_224",
        *,
        embed_dim: int = 1000,
        head: str = "linear",
        proj_hidden_dim: int = 2048,
        img_size: int | None = None,
        vit_patch_size: int | None = None,
        small_stem: bool | None = None,
        drop_path_rate: float | None = None,
        pretrained: bool = False,
        cnn_pretrained_file: str | Path | None = None,
        vit_pretrained_file: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"CASS head must be one of {HEADS}, got {head!r}")
        if embed_dim <= 0:
            raise ValueError(f"CASS embed_dim must be positive, got {embed_dim}")
        self.embed_dim = int(embed_dim)
        self.head_kind = head
        # With projector heads the backbones output pooled features (num_classes=0).
        backbone_classes = self.embed_dim if head == "linear" else 0
        self.img_size = img_size
        self.cnn_spec = plan_backbone(cnn, num_classes=backbone_classes, img_size=img_size, small_stem=small_stem)
        self.vit_spec = plan_backbone(vit, num_classes=backbone_classes, img_size=img_size,
                                      patch_size=vit_patch_size, drop_path_rate=drop_path_rate)
        weights = dict(pretrained=pretrained, cache_dir=cache_dir)
        self.cnn = build_from_spec(self.cnn_spec, pretrained_file=cnn_pretrained_file, **weights)
        self.vit = build_from_spec(self.vit_spec, pretrained_file=vit_pretrained_file, **weights)
        if head == "mlp":
            self.cnn_head: nn.Module = projector(self.cnn.num_features, proj_hidden_dim, self.embed_dim)
            self.vit_head: nn.Module = projector(self.vit.num_features, proj_hidden_dim, self.embed_dim)
        else:
            self.cnn_head = nn.Identity()
            self.vit_head = nn.Identity()

    def forward(self, images: torch.Tensor, vit_images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z_cnn, z_vit)``, the two branches' embeddings of ``images`` [B, 3, H, W].

        The ViT sees ``vit_images`` instead when given: another augmentation of the same images.
        """
        vit_images = images if vit_images is None else vit_images
        return self.cnn_head(self.cnn(images)), self.vit_head(self.vit(vit_images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the pooled backbone features ``(f_cnn, f_vit)`` (before any classifier or head), for probes."""
        return pooled_features(self.cnn, images), pooled_features(self.vit, images)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn non-reentrant gradient checkpointing on or off in both backbones; returns None."""
        set_grad_checkpointing(self.cnn, enable)
        set_grad_checkpointing(self.vit, enable)

    def describe(self) -> dict[str, Any]:
        """Return a JSON-able description: branch names, timm keywords and stems, image size, head, embedding size."""
        return {
            "cnn": self.cnn_spec.to_dict(),
            "vit": self.vit_spec.to_dict(),
            "image_size": self.img_size,
            "head": self.head_kind,
            "embed_dim": self.embed_dim,
        }


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Return a 3-layer projector MLP with BatchNorm (SimCLR/VICReg style) from ``in_dim`` to ``out_dim``."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )

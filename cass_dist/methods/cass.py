"""CASS behind the method contract: today's CASSPretrainer (the CNN + ViT pair and its objective)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from cass_dist.configs.pretrain import OptimSection, PretrainConfig
from cass_dist.losses.cass import Objective, build_objective
from cass_dist.methods.base import Method
from cass_dist.models.cass import CASS
from cass_dist.models.pretrainer import CASSPretrainer


class CASSMethod(CASSPretrainer, Method):
    """CASS: ``forward(views)`` gives ``views[0]`` to the CNN and ``views[-1]`` to the ViT.

    A subclass of CASSPretrainer, so its state dict (``model.*``, ``objective.*``) is the one
    checkpoints made before the method contract hold. ``forward`` also takes a plain image tensor
    (both branches see it), as CASSPretrainer does.
    """

    name = "cass"

    def __init__(self, model: CASS, objective: Objective, *, objective_name: str = "", channels_last: bool = False):
        super().__init__(model, objective)
        self.objective_name = objective_name or type(objective).__name__
        self.channels_last = channels_last

    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor, vit_images: torch.Tensor | None = None, *,
                global_step: int = 0, total_steps: int = 1) -> dict[str, torch.Tensor]:
        if torch.is_tensor(views):
            cnn_images = views
            vit_images = views if vit_images is None else vit_images
        else:
            cnn_images, vit_images = views[0], views[-1]
        if self.channels_last:
            cnn_images = cnn_images.contiguous(memory_format=torch.channels_last)
        return super().forward(cnn_images, vit_images)

    def optimizer_groups(self, optim: OptimSection, *, world_size: int = 1) -> list[dict[str, Any]]:
        return self.param_groups(lr_cnn=optim.lr_cnn, lr_vit=optim.lr_vit, weight_decay_cnn=optim.weight_decay_cnn,
                                 weight_decay_vit=optim.weight_decay_vit)

    def backbones(self) -> dict[str, nn.Module]:
        return {"cnn": self.model.cnn, "vit": self.model.vit}

    def export_parts(self) -> tuple[dict[str, nn.Module], dict[str, Any]]:
        return self.backbones(), {"method": self.name, **self.model.describe()}

    def summary_line(self) -> str:
        return (f"CASS: {type(self.model.cnn).__name__} + {type(self.model.vit).__name__}, "
                f"objective {self.objective_name}")


def build_cass(cfg: PretrainConfig) -> CASSMethod:
    """Return the CASS pair + objective as one module (grad checkpointing, channels_last, compile applied).

    Raises BackboneError / WeightsUnavailableError for bad model names or weights, ValueError for an
    unknown objective or objective keyword.
    """
    m = cfg.model
    cass = CASS(m.cnn, m.vit, embed_dim=m.embed_dim, head=m.head, proj_hidden_dim=m.proj_hidden_dim,
                img_size=cfg.data.image_size, vit_patch_size=m.vit_patch_size, small_stem=m.small_stem,
                drop_path_rate=m.drop_path_rate,
                pretrained=m.pretrained, cnn_pretrained_file=m.pretrained_cnn_file or None,
                vit_pretrained_file=m.pretrained_vit_file or None, cache_dir=m.cache_dir or None)
    if m.grad_checkpointing:
        cass.set_grad_checkpointing(True)
    if m.channels_last:
        cass.cnn.to(memory_format=torch.channels_last)
    if m.compile:  # in place, so state_dict keys (checkpoints, exports) stay unprefixed
        cass.cnn.compile()
        cass.vit.compile()
    objective = build_objective(cfg.objective.name, embed_dim=m.embed_dim, gather=cfg.objective.gather,
                                **cfg.objective.kwargs)
    return CASSMethod(cass, objective, objective_name=cfg.objective.name, channels_last=m.channels_last)

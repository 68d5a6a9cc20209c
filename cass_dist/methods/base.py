"""The contract every pretraining method keeps, so ``engine/pretrain.py`` stays ONE loop for all of them.

A method is one ``nn.Module`` (so DDP / DeepSpeed wrap one thing and ``accelerator.save_state``
checkpoints everything it holds, teacher and centre included). The loop calls, in this order::

    method = build_method(cfg)                          # cass_dist.methods
    optimizer = AdamW(method.optimizer_groups(cfg.optim, world_size=W))
    method.attach_optimizer(optimizer)                  # before accelerator.prepare
    transform = method.view_transform(manifest)         # None: the data section's augmentation
    ... per step, per micro-batch:
    out = model(views, global_step=s, total_steps=T)    # views: list of [B, 3, h, w] float tensors
    ... backward, optimizer step (the engine's) ...
    method.after_step(s, T)                             # s: the index of the step just taken (0-based)
    ... at the end:
    export_backbones(method, run.export_dir)            # through method.export_parts()

``forward`` returns ``{"loss": fp32 scalar, <term>: detached scalar ..., "z_<branch>": [B, D]}``:
the ``z_`` entries are the embeddings the collapse monitor watches (one per branch the method
trains). Everything a method does at step ``s`` is a function of ``s`` and ``T`` (schedules, teacher
momentum), never of a counter of its own, so a resumed run is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from cass_dist.configs.pretrain import OptimSection
from cass_dist.data.manifest import Manifest

BRANCHES = ("cnn", "vit")
# The device-transform contract: uint8 [B, C, H, W] on the device -> views, float32 [B, 3, h, w], normalised.
DeviceTransform = Callable[..., list[torch.Tensor]]


class Method(nn.Module):
    """Base class of pretraining methods: the defaults are what a method without extras (CASS) needs."""

    name = "method"

    def forward(self, views: Sequence[torch.Tensor], *, global_step: int = 0,
                total_steps: int = 1) -> dict[str, torch.Tensor]:
        """Return the loss dict of one micro-batch of ``views`` (see the module docstring)."""
        raise NotImplementedError

    def optimizer_groups(self, optim: OptimSection, *, world_size: int = 1) -> list[dict[str, Any]]:
        """Return optimizer parameter groups; each carries ``name`` (the branch, for lr logging).

        ``world_size`` (processes) lets a method scale its lr with the global batch (DINO's rule).
        """
        raise NotImplementedError

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Register what must happen between backward and the optimizer step (e.g. DINO's clipping)."""

    def after_step(self, global_step: int, total_steps: int) -> None:
        """Update what follows the weights after optimizer step ``global_step`` (DINO's EMA teacher)."""

    def backbones(self) -> dict[str, nn.Module]:
        """Return the timm backbones a user evaluates, by branch ("cnn" / "vit"): the kNN monitor's and the export's."""
        raise NotImplementedError

    def export_parts(self) -> tuple[dict[str, nn.Module], dict[str, Any]]:
        """Return ``(backbones by branch, model.json description)`` for ``models.export.export_backbones``."""
        raise NotImplementedError

    def view_transform(self, manifest: Manifest) -> DeviceTransform | None:
        """Return the method's own device augmentation (DINO's multi-crop), or None for the data section's."""
        return None

    def summary_line(self) -> str:
        """Return one line naming the method and its networks, for the start of the run log."""
        return self.name


def split_decay(named: Sequence[tuple[str, nn.Parameter]], skip: set[str]) -> tuple[list, list]:
    """Return ``(decay, no_decay)`` parameters: norms, biases (ndim <= 1) and names in ``skip`` get no decay."""
    decay = [p for n, p in named if p.ndim > 1 and n not in skip]
    no_decay = [p for n, p in named if p.ndim <= 1 or n in skip]
    return decay, no_decay


def no_weight_decay_names(module: nn.Module, *, prefix: str) -> set[str]:
    """Return the parameter names the timm module lists in ``no_weight_decay()`` (pos embeds ...), prefixed."""
    names = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
    return {prefix + n for n in names}

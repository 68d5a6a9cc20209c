"""DINO's objective (Caron et al. 2021, ``facebookresearch/dino`` main_dino.py ``DINOLoss``) and its schedules.

The student's softmax at temperature ``student_temp`` is pulled, by cross-entropy, towards the
teacher's softmax of *centred* outputs at a lower, *sharpening* temperature. Every student crop is
matched with every teacher (global) crop except the same view. Centring alone would make the teacher
uniform and sharpening alone one-hot; together they keep it from collapsing. The centre is an EMA of
the teacher's batch mean, averaged over all ranks, stored as a buffer (checkpointed with the model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def cosine_to_one(base: float, step: int, total_steps: int) -> float:
    """Return DINO's teacher momentum at ``step``: ``base`` at 0, rising as a half cosine to 1 at ``total_steps``."""
    progress = min(max(step, 0) / max(1, total_steps), 1.0)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(start: float, end: float, step: int, warmup_steps: int) -> float:
    """Return ``start`` moving linearly to ``end`` over ``warmup_steps`` steps, then ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


class DINOLoss(nn.Module):
    """``forward(student_crops, teacher_crops, teacher_temp) -> dict(loss, teacher_entropy, centre_norm, teacher_probs)``.

    ``student_crops``: logits ``[B, K]`` per crop (global crops first); ``teacher_crops``: the teacher's
    logits ``[B, K]`` for the global crops, in the same order. ``teacher_probs`` are the targets of the
    first teacher crop ``[B, K]``: the same row for every sample when DINO collapses (one-hot or
    uniform). ``centering=False`` drops the centre (the ablation that collapses). Raises ValueError
    when the crops do not fit together.
    """

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: bool = True):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_crops: Sequence[torch.Tensor], teacher_crops: Sequence[torch.Tensor],
                teacher_temp: float) -> dict[str, torch.Tensor]:
        if not teacher_crops or len(student_crops) < len(teacher_crops):
            raise ValueError(f"DINO needs at least one teacher crop and as many student crops, got "
                             f"{len(student_crops)} student and {len(teacher_crops)} teacher crops")
        teacher_logits = torch.cat([t.detach().float() for t in teacher_crops])
        centred = teacher_logits - self.center if self.centering else teacher_logits
        targets = F.softmax(centred / teacher_temp, dim=-1).chunk(len(teacher_crops))
        total, terms = 0.0, 0
        for t_index, target in enumerate(targets):
            for s_index, student in enumerate(student_crops):
                if s_index == t_index:  # the same view: nothing to learn
                    continue
                log_probs = F.log_softmax(student.float() / self.student_temp, dim=-1)
                total = total + torch.sum(-target * log_probs, dim=-1).mean()
                terms += 1
        if terms == 0:
            raise ValueError("DINO needs a student crop that is not the teacher's: give 2 global crops or local crops")
        probs = torch.cat(targets)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
        if self.training:
            self._update_center(teacher_logits)
        return {"loss": total / terms, "teacher_entropy": entropy.detach(), "centre_norm": self.center.norm().detach(),
                "teacher_probs": targets[0]}

    @torch.no_grad()
    def _update_center(self, teacher_logits: torch.Tensor) -> None:
        batch_sum = teacher_logits.sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_logits)), device=batch_sum.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch_sum)  # every rank ends with the same centre
            dist.all_reduce(count)
        batch_center = batch_sum / count
        new = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        # a non-finite teacher batch (an fp16 overflow on a step the engine then skips) must not poison
        # the centre for the rest of the run; elementwise, so no host sync
        self.center.copy_(torch.where(torch.isfinite(new), new, self.center))

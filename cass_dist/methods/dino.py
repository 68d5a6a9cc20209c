"""DINO (Caron et al. 2021) behind the method contract: one backbone (the CNN or the ViT), an EMA teacher.

Written against ``facebookresearch/dino`` (main_dino.py, vision_transformer.py ``DINOHead``, utils.py
``cosine_scheduler`` / ``clip_gradients`` / ``cancel_gradients_last_layer``). lightly 1.6 has the same
pieces but pulls pytorch-lightning, hydra and more into every install; DINO is ~200 lines here.

- The student (backbone + head) sees every crop; the teacher, a copy updated only by EMA with a
  momentum rising from ``momentum_teacher`` to 1 on a cosine (by global step), sees the 2 global crops.
- The loss centres and sharpens the teacher (``cass_dist.losses.dino``), with the teacher
  temperature warmed up linearly over the first ``teacher_temp_warmup`` of the run.
- Between backward and the optimizer step (an optimizer step pre-hook, so the engine's step stays
  the same for every method): each student parameter's gradient norm is clipped to ``clip_grad``,
  and the head's last layer gets no update during the first ``freeze_last_layer`` of the run.
- Exported and kNN-monitored: the TEACHER backbone, as DINO evaluates it (it is the better,
  smoother model); the student differs from it by one EMA window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from cass_dist.configs.base import ConfigError
from cass_dist.configs.methods import DinoSection
from cass_dist.configs.pretrain import OptimSection, PretrainConfig
from cass_dist.data.manifest import Manifest
from cass_dist.data.multicrop import MultiCrop, auto_local_crop_size
from cass_dist.losses.dino import DINOLoss, cosine_to_one, warmup_linear
from cass_dist.methods.base import Method, no_weight_decay_names, split_decay
from cass_dist.models.backbones import BackboneSpec, build_from_spec, plan_backbone, set_grad_checkpointing
from cass_dist.utils.deepspeed import deepspeed_requested

GLOBAL_CROPS = 2


class DINOHead(nn.Module):
    """DINO's projection head: MLP (GELU) to a bottleneck, l2-normalise, weight-normalised linear to ``out_dim``.

    ``forward(features) -> (logits [B, out_dim], bottleneck [B, bottleneck_dim] before normalisation)``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 use_bn: bool = False, norm_last_layer: bool = True, layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1)
        blocks: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            blocks += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*blocks, nn.Linear(dims[-1], bottleneck_dim))
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            scale.fill_(1.0)
        scale.requires_grad_(not norm_last_layer)  # fixed at 1: every prototype has unit norm

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.mlp(features)
        return self.last_layer(nn.functional.normalize(z, dim=-1)), z


class DINOMethod(Method):
    """DINO on one timm backbone; ``forward(views)`` takes ``[global_1, global_2, local_1, ...]``.

    Returns ``{"loss", "teacher_entropy", "centre_norm", "teacher_temp", "teacher_momentum",
    "z_<branch>"}``, where ``z_<branch>`` holds the teacher's targets (centred, sharpened softmax) of
    the first global crop: the collapse monitor sees them become the same for every sample when DINO
    collapses, to one prototype (no centring) or to uniform (no sharpening). Raises ValueError for
    fewer than 2 views.
    """

    name = "dino"

    def __init__(self, student: nn.Module, teacher: nn.Module, spec: BackboneSpec, *, branch: str, cfg: DinoSection,
                 out_dim: int, crop_sizes: tuple[int, int], batch_per_process: int = 256, channels_last: bool = False):
        super().__init__()
        self.branch, self.spec, self.cfg, self.out_dim = branch, spec, cfg, out_dim
        self.crop_sizes, self.channels_last = crop_sizes, channels_last
        self.batch_per_process = batch_per_process  # micro-batch x accumulation: a global batch per process
        head = dict(hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim, use_bn=cfg.use_bn_in_head)
        self.student, self.teacher = student, teacher
        self.student_head = DINOHead(student.num_features, out_dim, norm_last_layer=cfg.norm_last_layer, **head)
        self.teacher_head = DINOHead(student.num_features, out_dim, **head)
        self.teacher.load_state_dict(self.student.state_dict())  # the teacher starts as the student
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in self._teacher_params():
            p.requires_grad_(False)
        self.loss = DINOLoss(out_dim, student_temp=cfg.student_temp, center_momentum=cfg.center_momentum,
                             centering=cfg.centering)
        self._position = (0, 1)  # (global step, total steps) of the forward in progress, for the pre-step hook

    def _student_params(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.student_head.parameters())

    def _teacher_params(self) -> list[nn.Parameter]:
        return list(self.teacher.parameters()) + list(self.teacher_head.parameters())

    def _embed(self, backbone: nn.Module, head: DINOHead, views: Sequence[torch.Tensor]):
        # one backbone pass per run of same-size crops (DINO's MultiCropWrapper), then one head pass
        features, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            x = torch.cat(list(views[start:end]))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            features.append(backbone(x))
            start = end
        return head(torch.cat(features))

    def teacher_temperature(self, global_step: int, total_steps: int) -> float:
        """Return the teacher temperature at ``global_step`` (linear warmup, then constant)."""
        warmup = round(self.cfg.teacher_temp_warmup * total_steps)
        return warmup_linear(self.cfg.warmup_teacher_temp, self.cfg.teacher_temp, global_step, warmup)

    def forward(self, views: Sequence[torch.Tensor], *, global_step: int = 0,
                total_steps: int = 1) -> dict[str, torch.Tensor]:
        if torch.is_tensor(views) or len(views) < GLOBAL_CROPS:
            raise ValueError(f"DINO needs a list of at least {GLOBAL_CROPS} views (global crops first)")
        self._position = (global_step, total_steps)
        with torch.no_grad():
            teacher_logits, _ = self._embed(self.teacher, self.teacher_head, views[:GLOBAL_CROPS])
        student_logits, _ = self._embed(self.student, self.student_head, views)
        temp = self.teacher_temperature(global_step, total_steps)
        out = self.loss(student_logits.chunk(len(views)), teacher_logits.chunk(GLOBAL_CROPS), temp)
        out[f"z_{self.branch}"] = out.pop("teacher_probs")
        # plain floats: a tensor made from a Python number on CUDA would be a blocking copy every micro-batch
        return {**out, "teacher_temp": temp,
                "teacher_momentum": cosine_to_one(self.cfg.momentum_teacher, global_step, total_steps)}

    def optimizer_groups(self, optim: OptimSection, *, world_size: int = 1) -> list[dict[str, Any]]:
        """Return the student's groups: lr ``base_lr * global batch / 256`` (or ``optim.lr_<branch>`` when
        ``base_lr`` is 0), weight decay ``optim.weight_decay_<branch>`` except on norms, biases, position
        embeddings; the teacher has none (it follows by EMA)."""
        lr = self.learning_rate(optim, world_size)
        wd = getattr(optim, f"weight_decay_{self.branch}")
        named = [(f"student.{n}", p) for n, p in self.student.named_parameters() if p.requires_grad]
        named += [(f"student_head.{n}", p) for n, p in self.student_head.named_parameters() if p.requires_grad]
        decay, no_decay = split_decay(named, no_weight_decay_names(self.student, prefix="student."))
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": self.branch, "no_decay": flag}
                for params, weight_decay, flag in ((decay, wd, False), (no_decay, 0.0, True)) if params]

    def learning_rate(self, optim: OptimSection, world_size: int = 1) -> float:
        """Return the student's peak lr for ``world_size`` processes (see ``optimizer_groups``)."""
        if not self.cfg.base_lr:
            return getattr(optim, f"lr_{self.branch}")
        return self.cfg.base_lr * self.batch_per_process * world_size / 256

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_optimizer_step())

    @torch.no_grad()
    def _before_optimizer_step(self) -> None:
        # runs after gradients are reduced (and unscaled by a GradScaler), right before the update
        if self.cfg.clip_grad:
            for p in self._student_params():
                if p.grad is not None:  # per parameter, as DINO's utils.clip_gradients
                    p.grad.mul_((self.cfg.clip_grad / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        step, total = self._position
        if step < round(self.cfg.freeze_last_layer * total):
            for p in self.student_head.last_layer.parameters():
                p.grad = None  # no gradient: AdamW leaves the parameter, its moments and its decay alone

    @torch.no_grad()
    def after_step(self, global_step: int, total_steps: int) -> None:
        momentum = cosine_to_one(self.cfg.momentum_teacher, global_step, total_steps)
        teacher, student = self._teacher_params(), self._student_params()
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    def backbones(self) -> dict[str, nn.Module]:
        return {self.branch: self.teacher}

    def export_parts(self) -> tuple[dict[str, nn.Module], dict[str, Any]]:
        return self.backbones(), {"method": self.name, "exported": "teacher", self.branch: self.spec.to_dict(),
                                  "head": "dino", "out_dim": self.out_dim, "embed_dim": self.student.num_features}

    def view_transform(self, manifest: Manifest) -> MultiCrop:
        global_size, local_size = self.crop_sizes
        return MultiCrop(global_size=global_size, local_size=local_size, local_crops=self.cfg.local_crops,
                         mean=manifest.image.mean, std=manifest.image.std,
                         global_scale=tuple(self.cfg.global_crops_scale), local_scale=tuple(self.cfg.local_crops_scale))

    def summary_line(self) -> str:
        crops = f"{GLOBAL_CROPS} global crops of {self.crop_sizes[0]} px"
        if self.cfg.local_crops:
            crops += f" + {self.cfg.local_crops} local of {self.crop_sizes[1]} px"
        return (f"DINO: {type(self.student).__name__} ({self.branch}), {crops}, head {self.out_dim}, "
                f"teacher EMA {self.cfg.momentum_teacher} -> 1, centring {'on' if self.cfg.centering else 'OFF'}")


def build_dino(cfg: PretrainConfig) -> DINOMethod:
    """Return the DINO method for ``cfg`` (``cfg.dino`` plus the architecture in ``cfg.model``).

    Raises BackboneError / WeightsUnavailableError for bad model names or weights, ConfigError when
    DeepSpeed is launched with DINO's per-parameter clipping or last-layer freeze.
    """
    d, m = cfg.dino, cfg.model
    if deepspeed_requested() and (d.clip_grad or d.freeze_last_layer):
        # both act on the module's .grad before the optimizer step; ZeRO keeps gradients in its own buffers
        raise ConfigError("dino.clip_grad, dino.freeze_last_layer: not applied under DeepSpeed (ZeRO holds the "
                          "gradients); set both to 0 (run.clip_grad still clips globally) or launch with DDP")
    global_size = d.global_crop_size or cfg.data.image_size
    spec, build = _backbone_spec(cfg, global_size)
    student = build(spec.timm_kwargs)
    # The teacher has no stochastic depth (DINO builds it without): it runs in train mode for BatchNorm.
    teacher = build({k: v for k, v in spec.timm_kwargs.items() if k != "drop_path_rate"}, weights=False)
    multiple = _patch_size(student) if d.backbone == "vit" else 1
    local_size = d.local_crop_size or auto_local_crop_size(global_size, multiple)
    if m.grad_checkpointing:
        set_grad_checkpointing(student, True)
    if m.channels_last and d.backbone == "cnn":
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    method = DINOMethod(student, teacher, spec, branch=d.backbone, cfg=d, out_dim=d.resolved_out_dim(global_size),
                        crop_sizes=(global_size, local_size),
                        batch_per_process=cfg.data.batch_size * cfg.run.grad_accum_steps, channels_last=m.channels_last and d.backbone == "cnn")
    if m.compile:  # in place, so state_dict keys stay unprefixed
        method.student.compile()
        method.teacher.compile()
    return method


def _backbone_spec(cfg: PretrainConfig, global_size: int):
    """The ONE place DINO's backbones are made: returns (spec, build(timm_kwargs, weights=True) -> module).

    The spec comes from the same planner as CASS's branches (small stem at <= 64 px, patch size with
    >= 16 tokens), at the global crop size; a ViT also takes the smaller local crops (dynamic_img_size).
    """
    m, d = cfg.model, cfg.dino
    if d.backbone == "vit":
        name, weights_file = m.vit, m.pretrained_vit_file
        spec = plan_backbone(name, num_classes=0, img_size=global_size, patch_size=m.vit_patch_size,
                             drop_path_rate=m.drop_path_rate,
                             extra_kwargs={"dynamic_img_size": True} if d.local_crops > 0 else None)
    else:
        name, weights_file = m.cnn, m.pretrained_cnn_file
        spec = plan_backbone(name, num_classes=0, img_size=global_size, small_stem=m.small_stem)

    def build(timm_keywords: dict[str, Any], weights: bool = True) -> nn.Module:
        if not weights:
            return build_from_spec(BackboneSpec(name, timm_keywords, spec.small_stem))
        return build_from_spec(BackboneSpec(name, timm_keywords, spec.small_stem), pretrained=m.pretrained,
                               pretrained_file=weights_file or None, cache_dir=m.cache_dir or None)

    return spec, build


def _patch_size(vit: nn.Module) -> int:
    patch = getattr(getattr(vit, "patch_embed", None), "patch_size", 1)
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)

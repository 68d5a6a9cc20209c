"""Config sections of the pretraining methods other than CASS (``--method dino``); CASS uses model/objective.

DINO's defaults follow ``facebookresearch/dino`` (main_dino.py) where they do not depend on the
scale; what does (head size, local crop size) is derived from ``data.image_size`` when left at 0,
so the same flag set makes sense at 28-64 px on small medical datasets and at 224 px. Schedules are
fractions of the run (DINO counts epochs out of 100), so they stretch with ``--max-steps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cass_dist.configs.base import FieldError

METHODS = ("cass", "dino")
SMALL_IMAGE = 64  # at or below this many pixels, datasets are small and the head is sized down


@dataclass
class DinoSection:
    """DINO (Caron et al. 2021): a student matches an EMA teacher's centred, sharpened softmax."""

    backbone: Literal["cnn", "vit"] = "vit"  # which architecture DINO trains: model.cnn or model.vit
    out_dim: int = 0  # prototypes (head output size); 0 = auto: 4096 at image_size <= 64, else 65536 (DINO's)
    hidden_dim: int = 2048  # head MLP width
    bottleneck_dim: int = 256  # head bottleneck before the weight-normalised last layer
    norm_last_layer: bool = True  # fix the last layer's weight-norm scale at 1 (DINO's stable default)
    use_bn_in_head: bool = False  # BatchNorm in the head MLP
    student_temp: float = 0.1  # softmax temperature of the student
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0 (sharpening) ...
    teacher_temp: float = 0.04  # ... rising linearly to this; DINO's default; 0.07 for long runs (its README)
    teacher_temp_warmup: float = 0.3  # fraction of the run the teacher temperature warms up over (30 of 100 epochs)
    centering: bool = True  # subtract the running mean of teacher outputs; false collapses (an ablation)
    center_momentum: float = 0.9  # EMA of the centre, per step
    momentum_teacher: float = 0.996  # teacher EMA momentum at step 0, cosine to 1 at the end of the run
    freeze_last_layer: float = 0.01  # fraction of the run with the head's last layer frozen (1 of 100 epochs)
    base_lr: float = 5e-4  # lr at a global batch of 256, scaled linearly (DINO's rule); 0 = optim.lr_cnn/lr_vit as given
    clip_grad: float = 3.0  # per-parameter gradient norm clip of the student (DINO's); 0 = off
    local_crops: int = 8  # small crops per image for the student (multi-crop); 0 = two global crops only
    global_crop_size: int = 0  # pixels; 0 = data.image_size
    local_crop_size: int = 0  # pixels; 0 = auto: 96/224 of the global size, a multiple of the ViT patch
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area fraction range of the 2 global crops
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area fraction range of the local crops

    def validate(self) -> None:
        for name in ("out_dim", "global_crop_size", "local_crop_size", "local_crops"):
            if getattr(self, name) < 0:
                raise FieldError(name, "must be >= 0 (0 = auto where that applies)", getattr(self, name))
        for name in ("hidden_dim", "bottleneck_dim"):
            if getattr(self, name) < 1:
                raise FieldError(name, "must be >= 1", getattr(self, name))
        for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if not getattr(self, name) > 0:
                raise FieldError(name, "must be > 0", getattr(self, name))
        for name in ("teacher_temp_warmup", "freeze_last_layer", "center_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise FieldError(name, "must be in [0, 1]", getattr(self, name))
        if not 0 <= self.momentum_teacher <= 1:
            raise FieldError("momentum_teacher", "must be in [0, 1]", self.momentum_teacher)
        if self.base_lr < 0:
            raise FieldError("base_lr", "must be >= 0 (0: use optim.lr_cnn / lr_vit)", self.base_lr)
        if self.clip_grad < 0:
            raise FieldError("clip_grad", "must be >= 0 (0 disables clipping)", self.clip_grad)
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise FieldError(name, "must be [low, high] with 0 < low <= high <= 1", list(getattr(self, name)))

    def resolved_out_dim(self, image_size: int) -> int:
        """Return ``out_dim``, or its auto value for ``image_size`` when 0."""
        return self.out_dim or (4096 if image_size <= SMALL_IMAGE else 65536)

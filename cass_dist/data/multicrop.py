"""DINO's multi-crop augmentation on the training device (kornia), against the device-transform contract.

A device transform is ``transform(images, *, seed) -> list[Tensor]``: ``images`` is the uint8 batch
``[B, C, H, W]`` (C = stored channels, 1 or 3) already on the training device; the result is the list
of views, each float32 ``[B, 3, h, w]`` normalised with the manifest's mean/std (L expanded to 3
channels). The randomness comes from ``seed`` alone (the caller derives it from the run seed and the
position), so a resumed run draws the same crops.

:class:`MultiCrop` gives 2 global crops then ``local_crops`` small ones, as in DINO (Caron et al.
2021, ``DataAugmentationDINO``): random resized crops (bicubic), horizontal flip, colour jitter
(0.4, 0.4, 0.2, 0.1, p=0.8), grayscale (p=0.2), Gaussian blur (p=1.0 on the first global crop, 0.1 on
the second, 0.5 on local crops) and solarisation (p=0.2, second global crop only). Blur kernels and
sigmas scale with the crop size (DINO's sigma 0.1-2.0 is for 224 px), so 28 px images keep their
structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
import torch.nn as nn

REFERENCE_SIZE = 224  # DINO's global crop size: its blur sigmas are for this size
LOCAL_TO_GLOBAL = 96 / 224  # DINO's local/global crop size ratio


def auto_local_crop_size(global_size: int, multiple: int = 1) -> int:
    """Return DINO's local crop size for ``global_size`` (96 at 224), rounded to a ``multiple`` (a ViT patch).

    Never below one ``multiple`` nor below 8 px.
    """
    size = global_size * LOCAL_TO_GLOBAL
    if multiple > 1:
        return max(multiple, int(round(size / multiple)) * multiple)
    return max(8, int(round(size)))


def _blur(size: int, p: float) -> K.RandomGaussianBlur:
    scale = size / REFERENCE_SIZE
    kernel = max(3, int(round(0.1 * size)) | 1)  # odd, about 10% of the crop (23 at 224, as BYOL's)
    return K.RandomGaussianBlur((kernel, kernel), (0.1 * scale, 2.0 * scale), p=p)


class _Crop(nn.Module):
    """One kind of crop: random resized crop, flip, colour jitter, grayscale, blur, optional solarize."""

    def __init__(self, size: int, scale: tuple[float, float], *, blur_p: float, solarize_p: float = 0.0):
        super().__init__()
        steps = [
            K.RandomResizedCrop((size, size), scale=tuple(scale), resample="BICUBIC"),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            _blur(size, blur_p),
        ]
        if solarize_p:
            steps.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))  # invert above 0.5
        self.steps = nn.Sequential(*steps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # bicubic overshoots [0, 1]; clamp as PIL's uint8 output would
        return self.steps(images).clamp_(0.0, 1.0)


class MultiCrop(nn.Module):
    """``transform(images, *, seed) -> [global_1, global_2, local_1, ..., local_N]`` (see the module docstring).

    ``mean``/``std`` are per stored channel in [0, 1] (the manifest's). Raises ValueError for a bad
    size, scale range or crop count, and (when called) for images that are not uint8 ``[B, C, H, W]``
    with the stored channel count.
    """

    def __init__(self, *, global_size: int, local_size: int, local_crops: int, mean: Sequence[float],
                 std: Sequence[float], global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4)):
        super().__init__()
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
        if global_size < 8 or (local_crops and local_size < 4):
            raise ValueError(f"crop sizes too small: global {global_size}, local {local_size}")
        if local_crops < 0:
            raise ValueError(f"local_crops must be >= 0, got {local_crops}")
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"mean/std need 1 or 3 values each, got {list(mean)} and {list(std)}")
        self.channels = len(mean)
        self.local_crops = local_crops
        self.global_1 = _Crop(global_size, global_scale, blur_p=1.0)
        self.global_2 = _Crop(global_size, global_scale, blur_p=0.1, solarize_p=0.2)
        self.local = _Crop(local_size, local_scale, blur_p=0.5)
        means, stds = list(mean) * (3 // len(mean)), list(std) * (3 // len(std))
        self.register_buffer("mean", torch.tensor(means).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(stds).view(1, 3, 1, 1), persistent=False)

    @property
    def num_views(self) -> int:
        """Return 2 + local_crops: the length of the list a call returns."""
        return 2 + self.local_crops

    @torch.no_grad()
    def forward(self, images: torch.Tensor, *, seed: int) -> list[torch.Tensor]:
        """Return the views of ``images`` (uint8 ``[B, C, H, W]``), drawn from ``seed`` only."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"MultiCrop expects uint8 [B, {self.channels}, H, W] images, got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = images.float().div_(255.0).expand(-1, 3, -1, -1)  # grey images become 3 equal channels
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the caller's RNG streams stay untouched
            torch.manual_seed(seed)
            views = [self.global_1(x), self.global_2(x)] + [self.local(x) for _ in range(self.local_crops)]
        return [(v - mean) / std for v in views]

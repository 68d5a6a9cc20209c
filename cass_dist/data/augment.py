"""Augmentation and normalisation on the training device, in batch: the other half of the loader.

The contract every device transform keeps (the engine calls it at the batch boundary)::

    views = transform(images, seed=batch["seed"])

``images`` is the loader's uint8 batch ``[B, C, H, W]`` (C = the stored channels, 1 or 3) already on
the training device. The result is a list of views, each float32 ``[B, 3, h, w]`` normalised with
the manifest's mean/std (L expanded to 3 channels): ``views`` of them for pretraining, one for
fine-tuning and evaluation. Each sample of each view gets its own random parameters (kornia
samples them per element); the parameters are drawn on the CPU from a generator seeded by ``seed``
alone, so a transform is a pure function of (images, seed) and the same on CPU and CUDA tensors, and
a resumed run, whose loader hands out the same per-batch seeds, augments exactly as the straight
run did. Nothing here reads a device tensor back to the host: kornia 0.9 applies an op with p < 1
to the whole batch and blends by a per-sample mask, with no data-dependent branch.

The named transforms are the CASS augmentations that once ran per image in the workers:

- ``pretrain``: the paper's (Singh & Cirrone): with p=0.3 colour jitter (0.2, 0.2, 0.2) then a 0.2
  perspective warp (itself p=0.5); with p=0.3 a rotation of up to 10 degrees; vertical and
  horizontal flips with p=0.3 each.
- ``ssl``: random resized crop (scale 0.35-1), horizontal flip, brightness/contrast jitter 0.4
  (p=0.8), Gaussian blur 3x3 with sigma 0.1-1 (p=0.5): stronger, for two views.
- ``finetune``: affine (10 degrees, 5% shift, 0.95-1.05 scale) with p=0.3, flips with p=0.3.
- ``eval``: none.

Where they differ from the former per-image torchvision versions: warps interpolate bilinearly
(torchvision's affine default was nearest), colour jitter applies its four factors in one random
order per batch (torchvision: per image), and ``ssl`` crops the worker-resized image rather than
the decoded original (workers ship the training size; a 0.35 crop is upsampled ~1.7x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import kornia.augmentation as K
import torch
import torch.nn.functional as torch_f

from cass_dist.data.manifest import Manifest
from cass_dist.data.transforms import BatchNormalizer, _size

TransformKind = Literal["pretrain", "ssl", "finetune", "eval"]
KINDS = ("pretrain", "ssl", "finetune", "eval")


class DeviceTransform(Protocol):
    """``transform(images, *, seed) -> list of float32 [B, 3, h, w] views`` (see the module docstring)."""

    def __call__(self, images: torch.Tensor, *, seed: int) -> list[torch.Tensor]: ...


class _ApplyTogether(torch.nn.Module):
    """Run ``ops`` in sequence on a random subset (probability p per sample) of the batch, as one step."""

    def __init__(self, p: float, *ops: torch.nn.Module):
        super().__init__()
        self.p = p
        self.ops = torch.nn.Sequential(*ops)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        chosen = torch.rand(len(images)) < self.p  # drawn on the CPU, like kornia's own gates
        out = self.ops(images)
        return torch.where(chosen.view(-1, 1, 1, 1).to(images.device, non_blocking=True), out, images)


def _colour(channels: int, brightness: float, contrast: float, saturation: float, p: float) -> K.ColorJitter:
    # Saturation needs colour; on one channel it is the identity anyway (as in torchvision).
    return K.ColorJitter(brightness, contrast, saturation if channels == 3 else 0.0, 0.0, p=p)


def _augmentation(kind: str, size: list[int], channels: int) -> torch.nn.Module | None:
    if kind == "eval":
        return None
    if kind == "pretrain":
        return torch.nn.Sequential(
            _ApplyTogether(0.3, _colour(channels, 0.2, 0.2, 0.2, p=1.0), K.RandomPerspective(0.2, p=0.5)),
            K.RandomAffine(degrees=10, p=0.3),
            K.RandomVerticalFlip(p=0.3),
            K.RandomHorizontalFlip(p=0.3),
        )
    if kind == "ssl":
        return torch.nn.Sequential(
            K.RandomResizedCrop(tuple(size), scale=(0.35, 1.0), cropping_mode="resample"),
            K.RandomHorizontalFlip(p=0.5),
            _colour(channels, 0.4, 0.4, 0.0, p=0.8),
            K.RandomGaussianBlur(3, (0.1, 1.0), p=0.5),
        )
    if kind == "finetune":
        return torch.nn.Sequential(
            K.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05), p=0.3),
            K.RandomVerticalFlip(p=0.3),
            K.RandomHorizontalFlip(p=0.3),
        )
    raise ValueError(f"transform must be one of {list(KINDS)}, got {kind!r}")


class BatchAugment:
    """A device transform (see the module docstring) built from a kornia pipeline, or normalisation alone."""

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor] | None, *, size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], views: int = 1, channels: int | None = 3,
                 crops: bool = False):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.augment, self.size, self.views, self.crops = augment, list(size), views, crops
        self.normalize = BatchNormalizer(mean, std, channels)

    def _fit(self, images: torch.Tensor) -> torch.Tensor:
        # Workers ship the training size; anything else (a custom loader) is resized here.
        if self.crops or list(images.shape[-2:]) == self.size:
            return images
        return torch_f.interpolate(images, size=self.size, mode="bilinear", antialias=True, align_corners=False)

    def __call__(self, images: torch.Tensor, *, seed: int) -> list[torch.Tensor]:
        """Return the list of views; raises ValueError for anything but a uint8 [B, C, H, W] batch."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"a device transform takes uint8 [B, C, H, W] images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if self.augment is None:
            if list(images.shape[-2:]) == self.size:
                view = self.normalize(images)
            else:
                view = self.normalize.from_unit(self._fit(images.float().div_(255)))
            return [view] * self.views  # deterministic: every view is the same image
        unit = self._fit(images.float().div_(255))
        # Parameters come from the CPU generator (kornia samples there), seeded here and restored
        # afterwards: nothing else's randomness is touched, and view v's draw follows view v-1's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = []
            for _ in range(self.views):
                out = self.augment(unit)
                views.append(self.normalize.from_unit(out if out is not unit else out.clone()))
            return views

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.augment}, size={self.size}, views={self.views})"


def build_device_transform(kind: str, *, image_size: int | Sequence[int], mean: Sequence[float],
                           std: Sequence[float], views: int = 1, channels: int | None = 3) -> BatchAugment:
    """Return the named device transform (``pretrain``, ``ssl``, ``finetune``, ``eval``).

    ``mean``/``std`` are per stored channel (their length is the channel count the transform takes);
    ``channels`` is what the views get (3 expands L; None keeps the stored count).
    Raises ValueError for an unknown kind or views < 1.
    """
    size = _size(image_size)
    return BatchAugment(_augmentation(kind, size, len(mean)), size=size, mean=mean, std=std, views=views,
                        channels=channels, crops=kind == "ssl")


def manifest_transform(kind: str, manifest: Manifest, *, image_size: int | Sequence[int] | None = None,
                       views: int = 1, channels: int | None = 3) -> BatchAugment:
    """``build_device_transform`` with the shard set's mean/std (and image size when ``image_size`` is None).

    Raises ValueError when the images have mixed sizes and no ``image_size`` is given.
    """
    if image_size is None:
        if manifest.image.size is None:
            raise ValueError("images have mixed sizes (manifest image.size is null); pass image_size")
        image_size = manifest.image.size
    return build_device_transform(kind, image_size=image_size, mean=manifest.image.mean, std=manifest.image.std,
                                  views=views, channels=channels)

"""Image decoding and augmentation on uint8 tensors, and batch normalisation.

The per-sample pipeline is: bytes -> PIL decode (JPEG in draft mode, so a 512 px scan decodes at
256 px when 224 px is wanted) -> uint8 CxHxW tensor -> resize first (so colour jitter and warps touch
few pixels) -> torchvision.transforms.v2 augmentation on uint8 (PIL for the warps, where it is faster). Normalisation with the manifest's
mean/std and the L -> 3-channel expansion run once per *batch* after collation: it is vectorised,
and it lets workers ship uint8 (4x less inter-process traffic than float32).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

TransformKind = Literal["pretrain", "ssl", "finetune", "eval"]
ImageTransform = Callable[[torch.Tensor], torch.Tensor]


def decode_image(data: bytes, mode: str, size_hint: Sequence[int] | None = None) -> torch.Tensor:
    """Decode PNG/JPEG bytes into a uint8 CxHxW tensor in ``mode`` ("RGB" or "L").

    ``size_hint`` (height, width) lets JPEG decode at a reduced scale that is still at least that
    large. Raises whatever PIL raises for undecodable data (OSError, ValueError, SyntaxError ...).
    """
    with Image.open(io.BytesIO(data)) as img:
        if size_hint is not None and img.format == "JPEG":
            img.draft(mode, (int(size_hint[1]), int(size_hint[0])))
        if img.mode != mode:
            img = img.convert(mode)
        else:
            img.load()
        return F.pil_to_tensor(img)


def _size(image_size: int | Sequence[int]) -> list[int]:
    if isinstance(image_size, int):
        return [image_size, image_size]
    if len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return [int(image_size[0]), int(image_size[1])]


class ResizeAugment:
    """Resize a uint8 tensor, then apply random steps and flips; returns a uint8 tensor.

    ``steps`` are (transform, probability) pairs run in order on a PIL image, and only when at least
    one fires. Measured per 224 px image on one core: torch's antialiased uint8 resize beats PIL's,
    while PIL's affine (10x), colour enhance (2x) and perspective warps beat torch's float grid
    sampling; the tensor -> PIL -> tensor round trip (~0.4 ms) is skipped when no step fires.
    """

    def __init__(self, image_size: int | Sequence[int], steps: Sequence[tuple[Callable, float]],
                 flip_p: float = 0.3):
        self.resize = v2.Resize(_size(image_size), antialias=True)
        self.steps = list(steps)
        self.flip_p = flip_p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.resize(image)
        chosen = [step for step, p in self.steps if torch.rand(1).item() < p]
        if chosen:
            pil = F.to_pil_image(image)
            for step in chosen:
                pil = step(pil)
            image = F.pil_to_tensor(pil)
        if torch.rand(1).item() < self.flip_p:
            image = F.vertical_flip(image)
        if torch.rand(1).item() < self.flip_p:
            image = F.horizontal_flip(image)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resize}, steps={self.steps}, flip_p={self.flip_p})"


def pretrain_transform(image_size: int | Sequence[int]) -> ImageTransform:
    """Return the CASS paper's pretraining augmentation (Singh & Cirrone, MIDL 2023) on uint8 tensors.

    Resize to ``image_size``; with p=0.3 colour jitter (0.2, 0.2, 0.2) then a 0.2 perspective warp
    (itself p=0.5); with p=0.3 an affine rotation of up to 10 degrees; vertical and horizontal flips
    with p=0.3 each.
    """
    colour_and_warp = v2.Compose([v2.ColorJitter(0.2, 0.2, 0.2), v2.RandomPerspective(distortion_scale=0.2)])
    return ResizeAugment(image_size, [(colour_and_warp, 0.3), (v2.RandomAffine(degrees=10), 0.3)])


def ssl_transform(image_size: int | Sequence[int]) -> ImageTransform:
    """Return a SimCLR-style augmentation sized for grey medical images, on uint8 tensors.

    A random resized crop (scale 0.35-1, aspect 3/4-4/3), horizontal flip (p=0.5), brightness and
    contrast jitter of 0.4 (p=0.8) and a small Gaussian blur (p=0.5). Stronger than the paper's, for
    two views (``data.views=2``): what differs between the views is what the features learn to ignore.
    """
    size = _size(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 1.0))], p=0.5),
    ])


class Views:
    """Apply ``transform`` ``count`` times to one image: returns the views stacked, ``[count, C, H, W]``."""

    def __init__(self, transform: ImageTransform, count: int):
        if count < 1:
            raise ValueError(f"views must be >= 1, got {count}")
        self.transform, self.count = transform, count

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.count)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, count={self.count})"


def finetune_transform(image_size: int | Sequence[int]) -> ImageTransform:
    """Return the fine-tuning augmentation: resize, mild affine (p=0.3), flips (p=0.3), on uint8 tensors."""
    affine = v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05))
    return ResizeAugment(image_size, [(affine, 0.3)])


def eval_transform(image_size: int | Sequence[int]) -> ImageTransform:
    """Return the deterministic evaluation transform: resize to ``image_size`` only."""
    return v2.Resize(_size(image_size), antialias=True)


def build_transform(kind: TransformKind, image_size: int | Sequence[int]) -> ImageTransform:
    """Return the named transform; raise ValueError for an unknown kind."""
    builders = {"pretrain": pretrain_transform, "ssl": ssl_transform, "finetune": finetune_transform,
                "eval": eval_transform}
    if kind not in builders:
        raise ValueError(f"transform must be one of {sorted(builders)} or a callable, got {kind!r}")
    return builders[kind](image_size)


class BatchNormalizer:
    """uint8 ...xCxHxW -> float32 normalised with the dataset's mean/std, L expanded to ``channels``.

    Leading dimensions are free: a batch of views ``[B, V, C, H, W]`` is normalised like ``[B, C, H, W]``.

    ``mean``/``std`` are per stored channel in [0, 1] (from the manifest). ``channels=None`` keeps the
    stored channel count; 3 (the default for the models) repeats a single L channel three times.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int | None = 3):
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need the same non-zero length, got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {list(std)}")
        if channels is not None and channels != len(mean) and len(mean) != 1:
            raise ValueError(f"cannot expand {len(mean)}-channel images to {channels} channels")
        self.channels = channels
        self.mean, self.std = list(mean), list(std)
        # Fold /255 into the affine map so one multiply-add does the whole job.
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Return float32 normalised images; raises ValueError on a channel-count mismatch."""
        if images.ndim < 4 or images.shape[-3] != self.scale.shape[0]:
            raise ValueError(f"images of shape {tuple(images.shape)}: the normaliser expects "
                             f"{self.scale.shape[0]} channels, as [..., C, H, W]")
        out = images.float().mul_(self.scale).add_(self.shift)
        if self.channels is not None and out.shape[-3] != self.channels:
            out = out.expand(*out.shape[:-3], self.channels, *out.shape[-2:]).contiguous()
        return out

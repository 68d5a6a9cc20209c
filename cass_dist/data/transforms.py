"""What the loader workers do to an image: decode its bytes and resize it to the training size, as uint8.

Everything random (augmentation) and everything float (normalisation) happens after the batch is on
the training device (``cass_dist.data.augment``), so a worker ships one uint8 image per sample.

Decoders, measured on the brain MRI JPEGs (mixed sizes, decoded at >= 224 px, 1 core; see
docs/data.md): simplejpeg with DCT-domain downscaling and PIL's ``draft`` both take 0.58 ms and give
the same pixels (libjpeg-turbo underneath, the same scaled IDCT); simplejpeg returns HWC arrays,
which torch's uint8 antialiased resize handles in 0.16 ms against 0.5 ms for PIL's CHW copy, so
JPEGs go through simplejpeg. ``torchvision.io.decode_jpeg`` cannot decode at a reduced scale (1.6
ms with the resize). PNG goes through PIL; raw ``.npy`` samples are a header parse and a copy.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

JPEG_MAGIC, NPY_MAGIC = b"\xff\xd8", b"\x93NUMPY"


def _size(image_size: int | Sequence[int]) -> list[int]:
    if isinstance(image_size, int):
        return [image_size, image_size]
    if len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return [int(image_size[0]), int(image_size[1])]


def _hwc_tensor(array: np.ndarray) -> torch.Tensor:
    """A CxHxW view of an HxW or HxWxC uint8 array (no copy; torch's resize is fastest on this layout)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1)


def _decode_jpeg(data: bytes, mode: str, size_hint: Sequence[int] | None) -> torch.Tensor | None:
    """simplejpeg decode at the smallest DCT scale >= size_hint; None when PIL must convert the colours."""
    _, _, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    if mode == "L" and colourspace.lower() != "gray":
        return None  # PIL's RGB -> L luma differs from libjpeg's Y channel: keep the stored-mode rule
    height, width = (int(size_hint[0]), int(size_hint[1])) if size_hint is not None else (0, 0)
    array = simplejpeg.decode_jpeg(data, "RGB" if mode == "RGB" else "GRAY", min_height=height, min_width=width)
    return _hwc_tensor(array)


def decode_image(data: bytes, mode: str, size_hint: Sequence[int] | None = None) -> torch.Tensor:
    """Decode JPEG, PNG (any PIL format) or ``.npy`` bytes into a uint8 CxHxW tensor in ``mode`` ("RGB" or "L").

    ``size_hint`` (height, width) lets JPEG decode at a reduced scale that is still at least that
    large. Raises whatever the decoder raises for undecodable data (ValueError, OSError,
    SyntaxError ...): callers count that as one corrupted sample.
    """
    if data[:2] == JPEG_MAGIC:
        tensor = _decode_jpeg(data, mode, size_hint)
        if tensor is not None:
            return tensor
    if data[:6] == NPY_MAGIC:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        channels = 1 if array.ndim == 2 else array.shape[2]
        if array.dtype != np.uint8 or channels != (3 if mode == "RGB" else 1):
            raise ValueError(f"raw image of dtype {array.dtype} and shape {array.shape} is not uint8 {mode}")
        return _hwc_tensor(array)
    with Image.open(io.BytesIO(data)) as img:
        if size_hint is not None and img.format == "JPEG":
            img.draft(mode, (int(size_hint[1]), int(size_hint[0])))
        img = img.convert(mode) if img.mode != mode else img
        return _hwc_tensor(np.asarray(img))


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Return ``image`` (uint8 CxHxW) resized to ``size`` (antialiased bilinear), or itself when it fits."""
    if list(image.shape[-2:]) == list(size):
        return image
    return F.resize(image, list(size), antialias=True)


def load_image(data: bytes, mode: str, size: Sequence[int] | None) -> torch.Tensor:
    """Decode ``data`` and bring it to ``size`` (None: as stored); raises like ``decode_image``."""
    image = decode_image(data, mode, size)
    return resize_image(image, size) if size is not None else image


class BatchNormalizer:
    """uint8 ...xCxHxW -> float32 normalised with the dataset's mean/std, L expanded to ``channels``.

    Runs on the images' device. Leading dimensions are free. ``mean``/``std`` are per stored
    channel in [0, 1] (from the manifest). ``channels=None`` keeps the stored channel count; 3 (the
    default for the models) repeats a single L channel three times. Float images in [0, 1] are
    normalised with ``from_unit``.
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
        self._affine: dict[tuple[torch.device, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def _scale_shift(self, device: torch.device, unit: float) -> tuple[torch.Tensor, torch.Tensor]:
        # One multiply-add does the whole job (/unit folded in); kept per device, built once.
        if (device, unit) not in self._affine:
            scale = torch.tensor([1 / (unit * s) for s in self.std]).view(-1, 1, 1)
            shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(-1, 1, 1)
            self._affine[(device, unit)] = (scale.to(device), shift.to(device))
        return self._affine[(device, unit)]

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim < 4 or images.shape[-3] != len(self.mean):
            raise ValueError(f"images of shape {tuple(images.shape)}: the normaliser expects "
                             f"{len(self.mean)} channels, as [..., C, H, W]")

    def _expand(self, out: torch.Tensor) -> torch.Tensor:
        if self.channels is not None and out.shape[-3] != self.channels:
            out = out.expand(*out.shape[:-3], self.channels, *out.shape[-2:]).contiguous()
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Return float32 normalised images from uint8 ones; raises ValueError on a channel-count mismatch."""
        self._check(images)
        scale, shift = self._scale_shift(images.device, 255.0)
        return self._expand(images.float().mul_(scale).add_(shift))

    def from_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Return float images in [0, 1] normalised (in place when they are float32), L expanded."""
        self._check(images)
        scale, shift = self._scale_shift(images.device, 1.0)
        return self._expand(images.float().mul_(scale).add_(shift))

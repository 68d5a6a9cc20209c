"""Image normalisation for the shards: any PIL-readable input -> 8-bit RGB or L, optional resize, encoded bytes.

Storage costs, measured on the brain MRI folder (docs/data.md): JPEG q95 at the source size is the
smallest and decodes at a reduced DCT scale; JPEG at the training size (``resize`` [224, 224]) needs
no resize in the workers; ``npy`` needs no decoding at all but takes H x W x C bytes per image, which
suits small images (MedMNIST's 28-128 px) far better than 224 px ones.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cass_dist.errors import CassError

MODES = ("RGB", "L")
FORMATS = ("png", "jpg", "npy")  # npy: raw uint8 pixels, no decoding cost, no compression
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")


class ImageError(CassError, ValueError):
    """An image could not be read or converted."""


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored in the shards."""

    mode: str = "RGB"  # "RGB" or "L"
    format: str = "png"  # "png" (lossless), "jpg" or "npy" (raw uint8)
    quality: int = 95  # JPEG quality, 1-95
    # int: the short side in pixels (aspect kept); [height, width]: exactly that size (the training
    # size, so workers skip the resize); None keeps the source size
    resize: int | list[int] | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if not 1 <= int(self.quality) <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality!r}")
        if isinstance(self.resize, (list, tuple)):
            if len(self.resize) != 2 or not all(isinstance(v, int) and v >= 1 for v in self.resize):
                raise ValueError(f"resize must be a short side or [height, width] of positive ints, got {self.resize!r}")
        elif self.resize is not None and int(self.resize) < 1:
            raise ValueError(f"resize must be a positive short-side length, got {self.resize!r}")


def to_8bit(image: Image.Image, mode: str) -> Image.Image:
    """Return ``image`` as 8-bit ``mode`` ("RGB" or "L").

    16-bit and 32-bit integer images (I;16, I, 16-bit PNG) are mapped linearly from 0..65535 to 0..255;
    float images are clipped to 0..255. Transparent pixels (RGBA, LA, P with transparency) are
    composited onto black, the background of most medical images.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        base = image.convert("RGBA")
        black = Image.new("RGBA", base.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, base).convert("RGB")
    if image.mode != mode:
        image = image.convert(mode)
    return image


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
    """Return ``image`` scaled (bicubic, antialiased) so that its short side is ``short`` pixels."""
    w, h = image.size
    scale = short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if size == (w, h) else image.resize(size, Image.BICUBIC, reducing_gap=3.0)


def resize_to(image: Image.Image, resize: int | list[int]) -> Image.Image:
    """Return ``image`` resized to a short side (int) or exactly to [height, width] (bicubic, antialiased)."""
    if isinstance(resize, (list, tuple)):
        size = (int(resize[1]), int(resize[0]))
        return image if image.size == size else image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    return resize_short_side(image, int(resize))


def encode(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """Return the PNG, JPEG or ``.npy`` (raw uint8 HxW or HxWx3) bytes of ``image``."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)  # fast; the shards are not an archive format
    elif fmt == "npy":
        np.save(buf, np.asarray(image), allow_pickle=False)
    else:
        image.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def open_image(data: bytes | np.ndarray | str | Path, name: str = "image") -> Image.Image:
    """Return a PIL image from encoded bytes, a path, or a uint8 (H,W) / (H,W,3) / (H,W,4) array.

    Raises ImageError naming ``name`` when the input cannot be decoded.
    """
    if isinstance(data, np.ndarray):
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[:, :, 0]
        if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] not in (3, 4)):
            raise ImageError(f"{name}: array of shape {data.shape} is not (H,W), (H,W,3) or (H,W,4)")
        if data.dtype == np.uint16:
            return Image.fromarray(data.astype(np.int32), "I")
        if data.dtype != np.uint8:
            raise ImageError(f"{name}: array dtype {data.dtype} is not uint8 or uint16")
        return Image.fromarray(data)
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
    except Exception as exc:  # PIL raises many types for bad files
        raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return image


def convert(data: bytes | np.ndarray, options: ImageOptions, name: str = "image"
            ) -> tuple[bytes, tuple[int, int], np.ndarray]:
    """Decode, normalise, resize and encode one image.

    Returns (encoded bytes, (height, width), stats) where stats is a float64 array of shape (C, 2)
    holding the per-channel sum and sum of squares of the stored pixels scaled to [0, 1].
    Raises ImageError naming ``name`` when the input cannot be decoded.
    """
    passthrough = False
    if isinstance(data, bytes):
        image = _open_lazy(data, name)
        if options.resize is not None and image.format == "JPEG":
            # Decode JPEGs at a reduced scale when we shrink them anyway: much faster, same quality.
            wanted = options.resize if isinstance(options.resize, (list, tuple)) else (options.resize,) * 2
            image.draft(options.mode, (int(wanted[1]), int(wanted[0])))
        # A file already in the stored format and mode is kept byte for byte: no re-encoding cost and
        # no second JPEG generation loss. It is still decoded, for the check and the statistics.
        passthrough = (options.resize is None and image.mode == options.mode
                       and image.format == {"png": "PNG", "jpg": "JPEG"}.get(options.format))
        try:
            image.load()
        except Exception as exc:
            raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    else:
        image = open_image(data, name)
    if not passthrough:
        image = to_8bit(image, options.mode)
        if options.resize is not None:
            image = resize_to(image, options.resize)
    # Channel sums from PIL's C histogram: exact, and much faster than numpy reductions over (N, C).
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(-1, 256)
    levels = np.arange(256) / 255.0
    stats = np.stack([counts @ levels, counts @ levels**2], axis=1)
    encoded = data if passthrough else encode(image, options.format, options.quality)
    return encoded, (image.size[1], image.size[0]), stats


def _open_lazy(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:
        raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def probe(data: bytes, name: str = "image") -> None:
    """Check that ``data`` has a readable image header (cheap: no pixel decoding); raise ImageError otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.size  # noqa: B018 - reading the header is the check
    except Exception as exc:
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc

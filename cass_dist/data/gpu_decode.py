"""``data.decode: gpu``: workers ship the JPEG bytes, the training GPU decodes them (batched nvJPEG).

With it the host does nothing per image but read the tar: the batch's ``image`` is an
``EncodedImages``, whose ``.to(device)`` (the engine's ordinary batch-boundary call) decodes every
JPEG through ``torchvision.io.decode_jpeg(list, device=...)``, resizes on that device and returns the
usual uint8 ``[B, C, H, W]`` batch. On a CPU device the same call decodes with libjpeg-turbo, which is
what the equality check against the GPU compares with (``tests/data/test_decode.py``,
``benchmarks/data_gpu_check.py``).

torchvision marks its image decoders deprecated from 0.29 in favour of TorchCodec; this module is
the one place to change when that happens. Workers check each JPEG's header (cheap), so plainly
wrong bytes are skipped and counted as usual; a JPEG damaged past its header fails the batch's
decode with an error naming its keys, since nvJPEG gives no per-image result: verify such shards
with ``cass-shards verify`` or ``--data.verify_shards``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import simplejpeg
import torch
import torch.nn.functional as torch_f
from torchvision.io import ImageReadMode, decode_jpeg

from cass_dist.errors import CassError


class GPUDecodeError(CassError, RuntimeError):
    """nvJPEG (or libjpeg on CPU) could not decode a batch; the message names its keys."""


def check_jpeg(data: bytes) -> None:
    """Raise ValueError unless ``data`` has a readable JPEG header (no pixel is decoded)."""
    simplejpeg.decode_jpeg_header(data)


class EncodedImages:
    """The JPEG bytes of one batch; ``.to(device)`` returns them decoded as uint8 ``[B, C, H, W]``.

    ``size`` is the (height, width) every image is resized to; ``mode`` "RGB" or "L".
    """

    def __init__(self, data: torch.Tensor, offsets: Sequence[int], *, mode: str, size: Sequence[int],
                 keys: Sequence[str] = ()):
        self.data, self.offsets = data, list(offsets)
        self.mode, self.size, self.keys = mode, list(size), list(keys)

    @classmethod
    def from_bytes(cls, items: Sequence[bytes], *, mode: str, size: Sequence[int],
                   keys: Sequence[str] = ()) -> EncodedImages:
        offsets = [0]
        for item in items:
            offsets.append(offsets[-1] + len(item))
        data = torch.frombuffer(bytearray(b"".join(items)), dtype=torch.uint8) if offsets[-1] else \
            torch.empty(0, dtype=torch.uint8)
        return cls(data, offsets, mode=mode, size=size, keys=keys)

    @classmethod
    def cat(cls, items: Sequence[EncodedImages]) -> EncodedImages:
        """One batch holding ``items`` in order."""
        parts, offsets, keys = [], [0], []
        for item in items:
            parts.append(item.data[item.offsets[0]:item.offsets[-1]])
            offsets += [offsets[-1] + o - item.offsets[0] for o in item.offsets[1:]]
            keys += item.keys
        data = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        return cls(data, offsets, mode=items[0].mode, size=items[0].size, keys=keys)

    def __getitem__(self, index: slice) -> EncodedImages:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("EncodedImages supports contiguous slices only")
        stop = max(start, stop)
        return EncodedImages(self.data, self.offsets[start:stop + 1], mode=self.mode, size=self.size,
                             keys=self.keys[start:stop])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pin_memory(self) -> EncodedImages:
        return EncodedImages(self.data.pin_memory(), self.offsets, mode=self.mode, size=self.size, keys=self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """Decode on ``device`` and resize to ``size``; raises GPUDecodeError naming the batch's keys."""
        del non_blocking  # decode_jpeg copies the bytes itself; the result is on the device already
        parts = [self.data[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        mode = ImageReadMode.RGB if self.mode == "RGB" else ImageReadMode.GRAY
        try:
            with warnings.catch_warnings():  # torchvision 0.29's deprecation notice, once per batch otherwise
                warnings.simplefilter("ignore", DeprecationWarning)
                images = decode_jpeg(parts, mode=mode, device=device) if parts else []
        except RuntimeError as exc:
            raise GPUDecodeError(f"JPEG decode on {device} failed for a batch holding {self.keys[:8]}... "
                                 f"({exc}); check the shards with `cass-shards verify`") from exc
        channels = 3 if self.mode == "RGB" else 1
        out = torch.empty(len(parts), channels, *self.size, dtype=torch.uint8, device=device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        for shape, members in by_size.items():
            group = torch.stack([images[i] for i in members])
            if list(shape) != self.size:  # float, so CPU and CUDA run the same antialiased kernel
                group = torch_f.interpolate(group.float(), size=self.size, mode="bilinear", antialias=True,
                                            align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
            out[torch.tensor(members, device=device)] = group
        return out

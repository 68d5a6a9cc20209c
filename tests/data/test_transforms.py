"""What the workers do (decode, resize, as uint8) and batch normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as F

from cass_dist.data.transforms import BatchNormalizer, decode_image, load_image


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("shape,mode", [((20, 30, 3), "RGB"), ((20, 30), "L")])
def test_png_decodes_to_the_exact_pixels(shape, mode):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    tensor = decode_image(encode(array, "PNG"), mode)
    assert tensor.dtype == torch.uint8
    expected = array if array.ndim == 3 else array[..., None]
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), expected)


def test_jpeg_draft_decodes_at_a_reduced_scale_no_smaller_than_asked():
    array = np.zeros((256, 256, 3), dtype=np.uint8)
    array[:, 128:] = 200
    data = encode(array, "JPEG")
    assert decode_image(data, "RGB").shape == (3, 256, 256)
    small = decode_image(data, "RGB", size_hint=(64, 64))
    assert small.shape == (3, 64, 64)
    assert small[:, :, :28].float().mean() < 10 and small[:, :, 36:].float().mean() > 190
    assert decode_image(data, "RGB", size_hint=(100, 100)).shape == (3, 128, 128)


def test_decoding_converts_to_the_requested_mode():
    array = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert decode_image(encode(array, "PNG"), "L").shape == (1, 8, 8)


def test_garbage_bytes_raise():
    with pytest.raises(Exception):  # noqa: B017 - PIL's own error type is what callers count as a skip
        decode_image(b"definitely not an image", "RGB")


def test_jpeg_decodes_like_pil_and_at_no_larger_a_scale():
    """simplejpeg (the loader's JPEG decoder) against PIL's draft decode, the reference it replaced.

    Where both pick the same DCT scale (PIL has 1, 1/2, 1/4, 1/8) the pixels are identical. libjpeg-turbo
    also offers the scales M/8 in between, so simplejpeg may decode smaller (never below the hint), and
    after the resize to the hint the two differ by a fraction of a grey level.
    """
    rng = np.random.default_rng(2)
    blocks = np.kron(rng.integers(0, 256, (24, 20, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 384 x 320
    smooth = np.asarray(Image.fromarray(blocks).filter(ImageFilter.GaussianBlur(6)))  # a photo-like image
    for quality in (75, 95):
        buffer = io.BytesIO()
        Image.fromarray(smooth).save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
        for hint in (None, (192, 160), (200, 160), (96, 80), (40, 40)):
            with Image.open(io.BytesIO(data)) as img:
                if hint is not None:
                    img.draft("RGB", (hint[1], hint[0]))
                expected = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
            ours = decode_image(data, "RGB", hint)
            if hint is None or ours.shape == expected.shape:
                assert torch.equal(ours, expected)
            else:
                assert hint[0] <= ours.shape[1] < expected.shape[1] and hint[1] <= ours.shape[2] < expected.shape[2]
                a, b = load_image(data, "RGB", hint), F.resize(expected, list(hint), antialias=True)
                assert (a.float() - b.float()).abs().mean() < 1.0
    grey = encode(smooth[:, :, 0], "JPEG")
    assert np.array_equal(decode_image(grey, "L").numpy()[0], np.asarray(Image.open(io.BytesIO(grey))))


def test_raw_npy_samples_decode_to_their_pixels():
    array = np.random.default_rng(3).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, array)
    assert np.array_equal(decode_image(buffer.getvalue(), "RGB").permute(1, 2, 0).numpy(), array)
    with pytest.raises(ValueError, match="not uint8 L"):
        decode_image(buffer.getvalue(), "L")


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_resizes_to_the_target_and_keeps_uint8(channels):
    array = np.random.default_rng(4).integers(0, 256, (40, 50, 3)[:2] + ((3,) if channels == 3 else ()),
                                              dtype=np.uint8)
    out = load_image(encode(array, "PNG"), "RGB" if channels == 3 else "L", (24, 32))
    assert out.dtype == torch.uint8 and out.shape == (channels, 24, 32)
    same = load_image(encode(array, "PNG"), "RGB" if channels == 3 else "L", (40, 50))
    expected = array if channels == 3 else array[..., None]
    assert np.array_equal(same.permute(1, 2, 0).numpy(), expected)  # already the size: untouched


def test_batch_normalizer_matches_the_textbook_formula():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = BatchNormalizer(mean, std)(images)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)


def test_batch_normalizer_expands_grayscale_to_three_identical_channels():
    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    out = BatchNormalizer([0.5], [0.25])(images)
    assert out.shape == (2, 3, 4, 4)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert BatchNormalizer([0.5], [0.25], channels=None)(images).shape == (2, 1, 4, 4)


def test_batch_normalizer_treats_views_like_a_batch():
    views = torch.randint(0, 256, (4, 2, 1, 5, 5), dtype=torch.uint8)
    normalise = BatchNormalizer([0.3], [0.2])
    out = normalise(views)
    assert out.shape == (4, 2, 3, 5, 5)
    assert torch.equal(out, normalise(views.flatten(0, 1)).view(4, 2, 3, 5, 5))


def test_batch_normalizer_rejects_bad_statistics_and_shapes():
    with pytest.raises(ValueError, match="std must be > 0"):
        BatchNormalizer([0.5], [0.0])
    with pytest.raises(ValueError, match="same non-zero length"):
        BatchNormalizer([0.5, 0.5], [0.2])
    with pytest.raises(ValueError, match="channels"):
        BatchNormalizer([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))

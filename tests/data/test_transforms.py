"""Decoding, augmentations and batch normalisation on uint8 tensors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cass_dist.data.transforms import (
    BatchNormalizer,
    build_transform,
    decode_image,
    eval_transform,
    pretrain_transform,
    ssl_transform,
)


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


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "eval"])
@pytest.mark.parametrize("channels", [1, 3])
def test_transforms_resize_to_the_target_and_keep_uint8(kind, channels):
    image = torch.randint(0, 256, (channels, 40, 50), dtype=torch.uint8)
    out = build_transform(kind, (24, 32))(image)
    assert out.dtype == torch.uint8 and out.shape == (channels, 24, 32)


def test_pretrain_augments_while_eval_is_deterministic():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    reference = eval_transform(32)(image)
    assert torch.equal(eval_transform(32)(image), reference)
    augment = pretrain_transform(32)
    changed = sum(not torch.equal(augment(image), reference) for _ in range(40))
    # An image stays untouched only when none of the four random steps fires: p = 0.7**4 ~ 0.24.
    assert 10 <= changed < 40


def test_unknown_transform_name_is_refused():
    with pytest.raises(ValueError, match="transform must be one of"):
        build_transform("strong", 32)


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


def test_ssl_augmentation_keeps_size_and_dtype_and_varies_with_the_seed():
    image = torch.randint(0, 256, (1, 40, 30), dtype=torch.uint8)
    augment = ssl_transform(24)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(augment(image))
    assert outs[0].shape == (1, 24, 24) and outs[0].dtype == torch.uint8
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_batch_normalizer_rejects_bad_statistics_and_shapes():
    with pytest.raises(ValueError, match="std must be > 0"):
        BatchNormalizer([0.5], [0.0])
    with pytest.raises(ValueError, match="same non-zero length"):
        BatchNormalizer([0.5, 0.5], [0.2])
    with pytest.raises(ValueError, match="channels"):
        BatchNormalizer([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))

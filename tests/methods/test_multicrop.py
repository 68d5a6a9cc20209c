"""DINO's multi-crop against the device-transform contract: shapes, dtype, normalisation, seeding, errors."""

import pytest
import torch

from cass_dist.data.multicrop import MultiCrop, auto_local_crop_size


def crops(**kwargs):
    settings = dict(global_size=28, local_size=12, local_crops=3, mean=[0.4], std=[0.2])
    return MultiCrop(**{**settings, **kwargs})


def grey_batch(n=6, size=28, seed=0):
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_views_are_two_global_then_local_crops_float_normalised_with_three_channels():
    views = crops()(grey_batch(), seed=1)
    assert [tuple(v.shape) for v in views] == [(6, 3, 28, 28)] * 2 + [(6, 3, 12, 12)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    for v in views:  # pixels in [0, 1] mapped by (x - 0.4) / 0.2; grey stays grey across the channels
        assert v.min() >= (0 - 0.4) / 0.2 - 1e-5 and v.max() <= (1 - 0.4) / 0.2 + 1e-5
    assert crops().num_views == 5


def test_normalisation_uses_the_manifest_statistics():
    # A white image stays white under crops, flips, blur, grayscale and contrast; brightness jitter
    # (p = 0.8, factor 0.6-1.4) darkens some samples and solarize blackens some, so over 64 samples the
    # brightest pixel of each channel is white: (1 - mean) / std.
    white = torch.full((64, 3, 16, 16), 255, dtype=torch.uint8)
    mc = MultiCrop(global_size=16, local_size=8, local_crops=1, mean=[0.5, 0.25, 0.75], std=[0.5, 0.25, 0.25])
    for view in mc(white, seed=0):
        per_channel = view.amax(dim=(0, 2, 3))
        assert torch.allclose(per_channel, torch.tensor([1.0, 3.0, 1.0]), atol=1e-4)


def test_the_seed_alone_fixes_the_crops_and_the_caller_rng_is_untouched():
    mc, images = crops(), grey_batch()
    torch.manual_seed(123)
    first = mc(images, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(5)  # a different caller RNG state
    again = mc(images, seed=7)
    torch.manual_seed(123)
    mc(images, seed=7)
    assert torch.equal(torch.rand(3), after)  # the transform drew nothing from the caller's stream
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = mc(images, seed=8)
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[1])  # the two global crops are independent draws


def test_local_crop_size_follows_dino_and_fits_the_vit_patch():
    assert auto_local_crop_size(224, 16) == 96  # DINO's own pair
    assert auto_local_crop_size(28, 7) == 14 and auto_local_crop_size(32, 8) == 16
    assert auto_local_crop_size(64, 8) % 8 == 0
    assert auto_local_crop_size(28) == 12  # a CNN takes any size


def test_bad_input_raises():
    with pytest.raises(ValueError, match="uint8"):
        crops()(grey_batch().float(), seed=0)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        crops()(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), seed=0)
    with pytest.raises(ValueError, match="local_scale"):
        crops(local_scale=(0.5, 0.2))

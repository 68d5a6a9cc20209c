"""Device transforms: the contract, per-sample randomness from the seed alone, independent views, CPU = CUDA."""

from __future__ import annotations

import pytest
import torch

from cass_dist.data.augment import KINDS, build_device_transform

MEAN3, STD3 = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]


def batch(n=16, channels=3, size=(24, 24), same=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if same:  # one image repeated: any difference between samples comes from the augmentation
        return torch.randint(0, 256, (1, channels, *size), generator=g, dtype=torch.uint8).expand(n, -1, -1, -1)
    return torch.randint(0, 256, (n, channels, *size), generator=g, dtype=torch.uint8)


def transform(kind, views=1, channels=3, size=24):
    mean, std = (MEAN3, STD3) if channels == 3 else ([0.5], [0.25])
    return build_device_transform(kind, image_size=size, mean=mean, std=std, views=views)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_transform_keeps_the_contract(kind, channels):
    views = transform(kind, views=2, channels=channels)(batch(channels=channels, size=(30, 28)), seed=5)
    assert len(views) == 2
    for view in views:
        assert view.dtype == torch.float32 and view.shape == (16, 3, 24, 24)  # resized, L expanded
        assert torch.isfinite(view).all()


def test_eval_is_the_textbook_normalisation():
    images = batch(4)
    expected = (images.float() / 255 - torch.tensor(MEAN3).view(1, 3, 1, 1)) / torch.tensor(STD3).view(1, 3, 1, 1)
    [out] = transform("eval")(images, seed=0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    grey = batch(4, channels=1)
    [out] = transform("eval", channels=1)(grey, seed=0)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    torch.testing.assert_close(out[:, 0], (grey[:, 0].float() / 255 - 0.5) / 0.25, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["pretrain", "ssl", "finetune"])
def test_augmentation_is_a_pure_function_of_the_seed_with_per_sample_parameters(kind):
    images = batch(32, same=True)
    augment = transform(kind)
    torch.manual_seed(1)
    [a] = augment(images, seed=7)
    torch.manual_seed(2)  # the global RNG plays no part ...
    [b] = augment(images, seed=7)
    assert torch.equal(a, b)
    [c] = augment(images, seed=8)
    assert not torch.equal(a, c)
    distinct = {tuple(x.flatten()[:64].tolist()) for x in a}
    assert len(distinct) > 5  # ... and the samples of one batch get their own parameters


def test_augmentation_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    transform("ssl", views=2)(batch(8), seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_two_views_are_independent_augmentations_of_the_same_images():
    images = batch(32)
    first, second = transform("ssl", views=2)(images, seed=11)
    differ = [not torch.equal(first[i], second[i]) for i in range(32)]
    assert sum(differ) > 0.9 * 32
    one, two = transform("eval", views=2)(images, seed=11)  # deterministic: both views are the image
    assert torch.equal(one, two)


def test_the_paper_augmentation_fires_as_often_as_the_paper_says():
    images = batch(400, size=(16, 16), same=True)
    [reference] = transform("eval", size=16)(images, seed=0)
    [out] = transform("pretrain", size=16)(images, seed=3)
    changed = sum(not torch.allclose(out[i], reference[i], atol=1e-4) for i in range(len(images))) / len(images)
    # An image stays untouched only when none of the four random steps fires: p = 0.7**4 ~ 0.24.
    assert 0.68 < changed < 0.84


def test_wrong_inputs_and_names_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        transform("eval")(batch(2).float(), seed=0)
    with pytest.raises(ValueError, match="transform must be one of"):
        transform("strong")
    with pytest.raises(ValueError, match="views must be >= 1"):
        transform("eval", views=0)
    with pytest.raises(ValueError, match="channels"):
        transform("eval")(batch(2, channels=1), seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_and_cpu_give_the_same_views(kind):
    images = batch(32, size=(64, 64))
    augment = build_device_transform(kind, image_size=56, mean=MEAN3, std=STD3, views=2)
    on_cpu = augment(images, seed=4)
    on_gpu = augment(images.cuda(), seed=4)
    for a, b in zip(on_cpu, on_gpu):
        torch.testing.assert_close(b.cpu(), a, atol=2e-3, rtol=0)

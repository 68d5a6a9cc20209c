"""The small-image rules of ``plan_backbone``: when a CNN gets a small stem, which patch size a ViT gets.

At 28 px a timm ResNet's 7x7 stride-2 stem and its stride-2 max-pool leave a 7x7 map for the first
stage and a 1x1 map for the last; MedMNIST v2's ResNet-18 (28) and solo-learn's CIFAR ResNets use a
3x3 stride-1 stem conv and no max-pool instead, which is what ``apply_small_stem`` builds (the
BatchNorm and everything after the stem are timm's). The rule is one constant: images of
``SMALL_IMAGE_MAX_PX`` or fewer pixels a side get it. A ViT whose own patch size gives fewer than
``MIN_VIT_TOKENS`` tokens gets the largest smaller patch that gives enough (28 px: 7, 16 tokens).

Loading plain-timm-style: a small-stem ResNet export loads with ``timm.create_model(name, **timm_kwargs)``,
``model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()`` and
``model.load_state_dict(safetensors.torch.load_file(path))`` (docs/downstream.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from cass_dist.models.errors import BackboneError

SMALL_IMAGE_MAX_PX = 64  # images this small or smaller get the small stem by default
MIN_VIT_TOKENS = 16  # a default ViT patch size gives at least this many tokens
SUPPORTED = "timm ResNet family (resnet*, resnext*, seresnet*, resnet*d ...) and conv_stem CNNs (efficientnet*, mobilenet*)"


def is_patch_model(model: nn.Module) -> bool:
    """Return True for ViT-like models: they embed patches (``patch_embed.patch_size``) and have no CNN stem."""
    return hasattr(getattr(model, "patch_embed", None), "patch_size")


def vit_patch_size(model: nn.Module, img_size: int, requested: int | None) -> tuple[int, str]:
    """Return ``(patch size, why)`` for a ViT-like ``model`` at ``img_size`` px.

    ``requested`` wins. Otherwise the model's own patch size, unless it gives fewer than
    ``MIN_VIT_TOKENS`` tokens; then the largest smaller size that gives enough, preferring one that
    divides ``img_size`` (no pixels cut off).
    """
    own = int(model.patch_embed.patch_size[0])
    if requested is not None:
        return int(requested), f"patch size {requested} as requested ({_tokens(img_size, requested)} tokens at {img_size} px)"
    if _tokens(img_size, own) >= MIN_VIT_TOKENS:
        return own, f"its own patch size {own} ({_tokens(img_size, own)} tokens at {img_size} px)"
    fits = [p for p in range(own - 1, 0, -1) if _tokens(img_size, p) >= MIN_VIT_TOKENS]
    if not fits:
        return 1, f"patch size 1 ({_tokens(img_size, 1)} tokens at {img_size} px: no patch size gives {MIN_VIT_TOKENS})"
    chosen = next((p for p in fits if img_size % p == 0), fits[0])
    return chosen, (f"patch size {chosen} instead of its own {own}, which gives {_tokens(img_size, own)} "
                    f"token(s) at {img_size} px ({_tokens(img_size, chosen)} tokens now; set model.vit_patch_size "
                    f"to choose)")


def _tokens(img_size: int, patch: int) -> int:
    return (img_size // patch) ** 2


def stem_kind(model: nn.Module) -> str | None:
    """Return how ``model``'s stem can be made stride-1 ("resnet", "conv_stem"), or None when it cannot."""
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet) and isinstance(model.maxpool, (nn.MaxPool2d, nn.Sequential)):
        return "resnet"
    stem = getattr(model, "conv_stem", None)
    if isinstance(stem, nn.Conv2d) and tuple(stem.stride) == (2, 2):
        return "conv_stem"
    return None


def decide_small_stem(model: nn.Module, name: str, img_size: int | None, requested: bool | None
                      ) -> tuple[bool, str]:
    """Return ``(use the small stem, why)`` for the CNN ``model``; ``requested`` None = automatic.

    Raises BackboneError when ``requested`` is True and the model has no stem to adapt.
    """
    kind = stem_kind(model)
    if requested:
        if kind is None:
            raise BackboneError(f"model.small_stem: timm model {name!r} ({type(model).__name__}) has no stem this "
                                f"package can make stride-1 (supported: {SUPPORTED}); set model.small_stem false")
        return True, f"{name}: small stem (stride-1 3x3 stem conv, no max-pool) as requested"
    if requested is False or img_size is None:
        return False, (f"{name}: timm's own stem (model.small_stem false)" if requested is False else "")
    if img_size > SMALL_IMAGE_MAX_PX:
        return False, ""
    if kind is None:
        return False, (f"{name}: keeps its own stem at {img_size} px: {type(model).__name__} has no stem this "
                       f"package can make stride-1 (supported: {SUPPORTED})")
    return True, (f"{name}: small stem (stride-1 3x3 stem conv, no max-pool) because images are {img_size} px "
                  f"<= {SMALL_IMAGE_MAX_PX}; set model.small_stem false for timm's stem")


def apply_small_stem(model: nn.Module, name: str) -> None:
    """Make ``model``'s stem stride-1 in place (ResNet: a fresh 3x3 conv1 and no max-pool); returns None.

    A deep (3x3) ResNet stem and a ``conv_stem`` keep their weights and only lose their stride.
    Raises BackboneError for a model with no stem to adapt.
    """
    kind = stem_kind(model)
    if kind is None:
        raise BackboneError(f"model.small_stem: timm model {name!r} ({type(model).__name__}) has no stem this "
                            f"package can make stride-1 (supported: {SUPPORTED}); set model.small_stem false")
    if kind == "conv_stem":
        model.conv_stem.stride = (1, 1)
        _scale_reductions(model, 2)
        return
    if isinstance(model.conv1, nn.Conv2d):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False,
                                device=old.weight.device, dtype=old.weight.dtype)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's init
    else:  # deep stem: three 3x3 convs, the first one strided
        model.conv1[0].stride = (1, 1)
    if isinstance(model.maxpool, nn.MaxPool2d):
        model.maxpool = nn.Identity()
    else:  # replace_stem_pool: a strided conv stands in for the pool
        next(m for m in model.maxpool.modules() if isinstance(m, nn.Conv2d)).stride = (1, 1)
    _scale_reductions(model, 4)


def _scale_reductions(model: nn.Module, factor: int) -> None:
    for info in getattr(model, "feature_info", None) or []:
        if isinstance(info, dict) and "reduction" in info:
            info["reduction"] = max(1, info["reduction"] // factor)


def load_weights(model: nn.Module, name: str, path: Path, state_dict: dict[str, Any]) -> list[str]:
    """Load ``state_dict`` into the small-stem ``model`` (timm's classifier rule); return the keys left fresh.

    A classifier of another size stays freshly initialised, as timm does for pretrained weights. A
    stem conv of another shape (the 7x7 conv of ImageNet weights) stays fresh too. Raises
    BackboneError when anything else is missing, unexpected or of another shape.
    """
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    stems = ("conv1.weight", "conv_stem.weight")
    fresh, weights = [], {}
    for key, value in state_dict.items():
        is_head = any(key.startswith(f"{h}.") for h in heads)
        fits = key in own and tuple(own[key].shape) == tuple(value.shape)
        if not fits and (is_head or key in stems):
            fresh.append(key)  # checked below: only the head or the stem may be left fresh
            continue
        weights[key] = value
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a shape mismatch outside the head and the stem
        raise BackboneError(f"weights file {path} does not fit timm model {name!r} with a small stem: {err}") from err
    stray = [k for k in missing if not (any(k.startswith(f"{h}.") for h in heads) or k in stems)]
    if stray or unexpected:
        raise BackboneError(f"weights file {path} does not fit timm model {name!r} with a small stem: "
                            f"missing {stray[:5]}, unexpected {list(unexpected)[:5]}")
    return sorted(set(fresh) | {k for k in missing if k in stems})

"""timm backbones: creation by name, pretrained weights (hub, local file, cache dir), gradient checkpointing.

Weights come from one of three places, in this order:

1. ``pretrained_file``: a local ``.safetensors`` / ``.pth`` file (what compute nodes without internet use);
2. ``cache_dir``: a Hugging Face cache directory that already holds the model's hub weights;
3. the Hugging Face hub, unless offline (``offline=True`` or ``HF_HUB_OFFLINE=1``).

When none of them can serve the weights, :class:`WeightsUnavailableError` says which were tried.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

from cass_dist.errors import CassError

HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class BackboneError(CassError, ValueError):
    """A backbone name, a timm keyword or a weights file does not fit the requested architecture."""


class WeightsUnavailableError(CassError, FileNotFoundError):
    """Pretrained weights were requested but no file, cache or hub could provide them."""


def timm_kwargs(
    name: str,
    *,
    num_classes: int,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float | None = None,
    dynamic_img_size: bool = False,
) -> dict[str, Any]:
    """Return the ``timm.create_model`` keywords (besides the name) that rebuild this architecture.

    ``img_size`` and ``patch_size`` only make sense for ViT-like models; they are left out when None so
    a CNN gets no keyword it does not know. Raises :class:`BackboneError` when timm does not know ``name``.
    """
    if not timm.is_model(name):
        raise BackboneError(f"timm has no model named {name!r} (see timm.list_models())")
    kwargs: dict[str, Any] = {"num_classes": int(num_classes)}
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    if patch_size is not None:
        kwargs["patch_size"] = int(patch_size)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    if dynamic_img_size:  # a ViT that takes any input size (DINO's local crops): interpolated position embeddings
        kwargs["dynamic_img_size"] = True
    return kwargs


def create_backbone(
    name: str,
    *,
    num_classes: int = 1000,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float | None = None,
    dynamic_img_size: bool = False,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
) -> nn.Module:
    """Create the timm model ``name``; returns it with random or pretrained weights.

    ``pretrained_file`` implies ``pretrained``. A classifier whose size differs from the weights' is
    freshly initialised (timm's rule), so ``num_classes`` may differ from the checkpoint's.

    Raises:
        BackboneError: unknown model, a keyword the model does not accept, or a weights file that does
            not fit the architecture.
        WeightsUnavailableError: weights requested but the file is missing, or neither the cache nor
            the hub (offline or unreachable) has them.
    """
    kwargs = timm_kwargs(
        name, num_classes=num_classes, img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path_rate,
        dynamic_img_size=dynamic_img_size,
    )
    if pretrained_file is not None:
        return _create_from_file(name, Path(pretrained_file), kwargs)
    if not pretrained:
        return _create(name, kwargs, pretrained=False)

    cached = _find_cached_hub_weights(name, cache_dir)
    if cached is not None:
        return _create_from_file(name, cached, kwargs)
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = f"cache dir {cache_dir}" if cache_dir is not None else "the default Hugging Face cache"
    if offline:
        raise WeightsUnavailableError(
            f"pretrained weights for {name!r}: offline and not found in {where}; "
            f"pass a local weights file (--pretrained-file) or a cache dir that holds them"
        )
    try:
        return _create(name, kwargs, pretrained=True, cache_dir=cache_dir)
    except (OSError, RuntimeError, ValueError) as err:  # network, missing hub entry, no weights for model
        raise WeightsUnavailableError(
            f"pretrained weights for {name!r}: the hub failed ({type(err).__name__}: {err}) and they are "
            f"not in {where}; pass a local weights file (--pretrained-file) or a cache dir that holds them"
        ) from err


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Turn timm gradient checkpointing on or off for ``model``; returns None.

    Checkpointing is forced to the non-reentrant variant, which works under DDP and with inputs that do
    not require grad. Raises :class:`BackboneError` when the model has no ``set_grad_checkpointing``.
    """
    if not hasattr(model, "set_grad_checkpointing"):
        raise BackboneError(f"{type(model).__name__} does not support timm gradient checkpointing")
    if enable and use_reentrant_ckpt():
        # TIMM_REENTRANT_CKPT=1 in the environment would break DDP with checkpointed blocks.
        set_reentrant_ckpt(False)
    model.set_grad_checkpointing(enable)


def pooled_features(model: nn.Module, images) -> Any:
    """Return the pooled pre-classifier features of a timm model for ``images`` (shape [B, num_features])."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _create(name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs, **extra)
    except TypeError as err:  # a keyword such as img_size given to a CNN
        raise BackboneError(f"timm model {name!r} rejected keywords {sorted(kwargs)}: {err}") from err


def _create_from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailableError(f"pretrained weights file {path} does not exist (for model {name!r})")
    overlay: dict[str, Any] = {"file": str(path)}
    file_classes = _classifier_rows(name, path)
    if file_classes is not None:
        # timm keeps a classifier only when the weights' class count equals the cfg's; say what the file has.
        overlay["num_classes"] = file_classes
    try:
        return _create(name, kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    except RuntimeError as err:  # load_state_dict: size mismatch, missing or unexpected keys
        raise BackboneError(f"weights file {path} does not fit timm model {name!r}: {err}") from err


def _classifier_rows(name: str, path: Path) -> int | None:
    """Rows of the classifier weight in a safetensors file (None when absent or not safetensors)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    classifier = timm.get_pretrained_cfg(name).to_dict().get("classifier") if _has_cfg(name) else None
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for head in names:
            if f"{head}.weight" in keys:
                return int(f.get_slice(f"{head}.weight").get_shape()[0])
    return None


def _has_cfg(name: str) -> bool:
    return timm.get_pretrained_cfg(name) is not None


def _find_cached_hub_weights(name: str, cache_dir: str | Path | None) -> Path | None:
    """The hub weights file of ``name`` already in ``cache_dir`` (or the default cache), else None."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    repo_id, _, revision = hub_id.partition("@")
    for filename in HUB_WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None

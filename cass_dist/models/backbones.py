"""timm backbones: creation by name, pretrained weights (hub, local file, cache dir), gradient checkpointing.

Small images (MedMNIST's 28 px) need two adaptations, both decided here for every caller (pretraining,
fine-tuning, evaluation, any method): ``plan_backbone`` turns a name and the image size into a
:class:`BackboneSpec` (see ``cass_dist.models.small_images`` for the rules and the stem surgery):

- CNNs get a *small stem* at ``image size <= 64`` (a stride-1 3x3 stem conv and no max-pool, as the
  CIFAR ResNets of MedMNIST v2 and solo-learn have); timm's 7x7 stride-2 stem + max-pool would end
  resnet18 at 28 px in a 1x1 map;
- ViTs are built for the image size, with the model's own patch size unless that gives fewer than 16
  tokens (vit_*_patch16 at 28 px: 1 token), then the largest smaller patch that gives 16 or more.

Weights come from one of three places, in this order:

1. ``pretrained_file``: a local ``.safetensors`` / ``.pth`` file (what compute nodes without internet use);
2. ``cache_dir``: a Hugging Face cache directory that already holds the model's hub weights;
3. the Hugging Face hub, unless offline (``offline=True`` or ``HF_HUB_OFFLINE=1``).

When none of them can serve the weights, :class:`WeightsUnavailableError` says which were tried.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

from cass_dist.models import small_images
from cass_dist.models.errors import BackboneError, WeightsUnavailableError

__all__ = ["BackboneError", "BackboneSpec", "WeightsUnavailableError", "build_from_spec", "create_backbone",
           "plan_backbone", "pooled_features", "set_grad_checkpointing", "timm_kwargs"]

HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
log = logging.getLogger("cass_dist")


@dataclass
class BackboneSpec:
    """How one backbone is built: everything needed to rebuild it from a weights file (export, classifier)."""

    name: str  # the timm model name
    timm_kwargs: dict[str, Any]  # keywords of timm.create_model (num_classes, img_size, patch_size ...)
    small_stem: bool = False  # stride-1 3x3 stem without max-pool (cass_dist.models.small_images)
    notes: list[str] = field(default_factory=list, compare=False, repr=False)  # automatic choices, for logs

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form written to model.json / classifier.json (without the notes)."""
        return {"name": self.name, "timm_kwargs": dict(self.timm_kwargs), "small_stem": self.small_stem}


def plan_backbone(
    name: str,
    *,
    num_classes: int,
    img_size: int | None = None,
    small_stem: bool | None = None,
    patch_size: int | None = None,
    drop_path_rate: float | None = None,
    extra_kwargs: dict[str, Any] | None = None,
) -> BackboneSpec:
    """Return the BackboneSpec of ``name`` for images of ``img_size`` px, applying the small-image rules.

    ``small_stem`` None means automatic (on for CNNs that support it at ``img_size <= 64``); True asks
    for it and fails on a model without a stem to adapt. ``patch_size`` None means the model's own
    unless that gives fewer than 16 tokens (:func:`small_images.vit_patch_size`). ViT-like models
    (those with a ``patch_embed``) get ``img_size`` and ``patch_size``; CNNs get neither. Keys of
    ``extra_kwargs`` (user-given timm keywords) win over the automatic ones. The spec's ``notes``
    say what was decided, and are logged. Raises BackboneError (unknown model, or a small stem asked
    of a model that has none to adapt).
    """
    extra = dict(extra_kwargs or {})
    kwargs = timm_kwargs(name, num_classes=num_classes, drop_path_rate=drop_path_rate)
    skeleton = _skeleton(name, extra)
    notes: list[str] = []
    if small_images.is_patch_model(skeleton):
        if small_stem:
            raise BackboneError(f"model.small_stem: {name!r} is a patch model (ViT-like), it has no CNN stem; "
                                f"set small_stem false or null for it")
        size = extra.get("img_size", img_size)
        if size is not None:
            kwargs["img_size"] = int(size)
            if "patch_size" not in extra:
                chosen, note = small_images.vit_patch_size(skeleton, int(size), patch_size)
                kwargs["patch_size"] = chosen
                notes.append(f"{name}: {note}")
        use_small_stem = False
    else:
        use_small_stem, note = small_images.decide_small_stem(skeleton, name, img_size, small_stem)
        if note:
            notes.append(note)
    kwargs.update(extra)
    spec = BackboneSpec(name, kwargs, use_small_stem, notes)
    for note in notes:
        if int(os.environ.get("RANK", "0")) == 0:  # once per job, not once per process
            log.info(note)
    return spec


def build_from_spec(spec: BackboneSpec | dict[str, Any], **weights: Any) -> nn.Module:
    """Return the backbone a spec (or its JSON form) describes; ``weights`` go to :func:`create_backbone`."""
    if isinstance(spec, dict):
        spec = BackboneSpec(spec["name"], dict(spec["timm_kwargs"]), bool(spec.get("small_stem", False)))
    return create_backbone(spec.name, **spec.timm_kwargs, small_stem=spec.small_stem, **weights)


def _skeleton(name: str, extra: dict[str, Any]) -> nn.Module:
    """The architecture without memory or weights (meta device): enough to read its stem and patch size."""
    if not timm.is_model(name):
        raise BackboneError(f"timm has no model named {name!r} (see timm.list_models())")
    with torch.device("meta"):
        return _create(name, {k: v for k, v in extra.items() if k != "num_classes"}, pretrained=False)


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
    small_stem: bool = False,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    **extra_kwargs: Any,
) -> nn.Module:
    """Create the timm model ``name``; returns it with random or pretrained weights.

    ``pretrained_file`` implies ``pretrained``. A classifier whose size differs from the weights' is
    freshly initialised (timm's rule), so ``num_classes`` may differ from the checkpoint's.
    ``small_stem`` gives a CNN a stride-1 3x3 stem without max-pool; its weights load from a file
    saved with that stem, and from standard (e.g. ImageNet) weights, whose stem conv is then dropped
    for a fresh one (its norm layer and everything after it load). ``extra_kwargs`` go to timm as is.

    Raises:
        BackboneError: unknown model, a keyword the model does not accept, or a weights file that does
            not fit the architecture.
        WeightsUnavailableError: weights requested but the file is missing, or neither the cache nor
            the hub (offline or unreachable) has them.
    """
    kwargs = timm_kwargs(
        name, num_classes=num_classes, img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path_rate,
        dynamic_img_size=dynamic_img_size,
    ) | extra_kwargs
    if small_stem:
        return _create_small_stem(name, kwargs, pretrained=pretrained, pretrained_file=pretrained_file,
                                  cache_dir=cache_dir, offline=offline)
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


def _create_small_stem(name: str, kwargs: dict[str, Any], *, pretrained: bool, pretrained_file: str | Path | None,
                       cache_dir: str | Path | None, offline: bool | None) -> nn.Module:
    """A small-stem CNN: timm builds it (with hub weights if asked), then its stem is adapted.

    A weights file is loaded after the surgery, so files saved with the small stem load exactly.
    """
    if pretrained and pretrained_file is None:  # hub / cache weights come with timm's stem: adapt afterwards
        model = create_backbone(name, **kwargs, pretrained=True, cache_dir=cache_dir, offline=offline)
        small_images.apply_small_stem(model, name)
        log.info(f"{name}: hub weights loaded; the small stem's conv starts fresh")
        return model
    model = _create(name, kwargs, pretrained=False)
    small_images.apply_small_stem(model, name)
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise WeightsUnavailableError(f"pretrained weights file {path} does not exist (for model {name!r})")
        fresh = small_images.load_weights(model, name, path, _read_weights(path))
        if any(key in ("conv1.weight", "conv_stem.weight") for key in fresh):
            log.info(f"{name}: {path} holds timm's standard stem; the small stem's conv starts fresh")
    return model


def _read_weights(path: Path) -> dict[str, Any]:
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path), weights_only=True)
    except Exception as err:  # safetensors' SafetensorError, pickle errors: a damaged or foreign file
        raise BackboneError(f"weights file {path} cannot be read ({type(err).__name__}: {err})") from err


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
    except AssertionError as err:  # timm's own checks, e.g. an image size its patch grid cannot tile
        raise BackboneError(f"timm model {name!r} refused keywords {kwargs}: {err or 'assertion failed'}") from err


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
    except BackboneError:
        raise
    except Exception as err:  # safetensors' SafetensorError (truncated file), a pickle error: damaged weights
        raise BackboneError(f"weights file {path} cannot be read ({type(err).__name__}: {err})") from err


def _classifier_rows(name: str, path: Path) -> int | None:
    """Rows of the classifier weight in a safetensors file (None when absent or not safetensors)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    classifier = timm.get_pretrained_cfg(name).to_dict().get("classifier") if _has_cfg(name) else None
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for head in names:
                if f"{head}.weight" in keys:
                    return int(f.get_slice(f"{head}.weight").get_shape()[0])
    except Exception as err:  # SafetensorError: a truncated or foreign file
        raise BackboneError(f"weights file {path} is not a readable safetensors file ({err})") from err
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

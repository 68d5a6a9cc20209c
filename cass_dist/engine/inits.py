"""Where a downstream backbone comes from (``model.init``), and the image size it is used at.

``model.init`` is ``random`` / ``imagenet`` (the architecture named in the config, planned for the run's
image size by ``cass_dist.models.plan_backbone``), a CASS export (run dir, export dir or
``.safetensors`` file: its stem and patch size are kept), or a fine-tuned run (its ``best/`` classifier,
for ``launch/evaluate.py``). ``read_init``, ``check_init_files`` and ``resolve_image_size`` read
only JSON and file headers, so a bad init fails before any run dir is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from cass_dist.configs.base import ConfigError
from cass_dist.configs.finetune import BUILTIN_INITS, DownstreamDataSection, DownstreamModelSection
from cass_dist.data.manifest import Manifest
from cass_dist.errors import CassError
from cass_dist.models import (
    BackboneError,
    WeightsUnavailableError,
    build_from_spec,
    export_image_size,
    load_backbone,
    plan_backbone,
    read_export_info,
)
from cass_dist.models.errors import ExportError
from cass_dist.models.export import check_spec, export_weights

WEIGHTS_FILE = "classifier.safetensors"
INFO_FILE = "classifier.json"
FORMAT_VERSION = 1


class ClassifierError(CassError, ValueError):
    """A saved classifier is missing, damaged, or trained for other classes than the dataset's."""


@dataclass
class InitSource:
    """Where ``model.init`` points: a builtin (random / imagenet), a CASS export, or a fine-tuned classifier."""

    kind: str  # "random", "imagenet", "export" or "classifier"
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)  # the export's model.json / the classifier.json, checked
    image_size: int | None = None  # the size its weights were trained at (None: unknown, or builtin)


def read_init(init: str) -> InitSource:
    """Return the checked InitSource of a ``model.init`` value (reads only JSON, no weights).

    Raises WeightsUnavailableError (no such path, or no complete export there), ExportError (a damaged
    or refused model.json), ClassifierError (a damaged classifier.json).
    """
    if init in BUILTIN_INITS:
        return InitSource(init)
    path = Path(init)
    if not path.exists():
        raise WeightsUnavailableError(f"model.init {init!r}: no such run dir, export dir or file, and not one of "
                                      f"{BUILTIN_INITS}")
    found = classifier_dir(path)
    if found is not None:
        info = read_classifier_info(found)
        return InitSource("classifier", found, info, info.get("image_size"))
    info = read_export_info(path)
    return InitSource("export", path, info, export_image_size(info))


def resolve_image_size(data_cfg: DownstreamDataSection, manifest: Manifest, source: InitSource,
                       branches: tuple[str, ...]) -> tuple[int, str]:
    """Return ``(image size, why)``: ``--image-size`` if set, else the init's own size, else the manifest's.

    A ViT trained at another size than ``--image-size`` is resized (export: timm resamples its position
    embeddings) when the new size holds at least one patch; a fine-tuned ViT classifier is refused.
    Raises BackboneError (a size the ViT cannot take), ClassifierError (a fine-tuned ViT at another
    size), ConfigError naming data.image_size (non-square or mixed-size images and no --image-size).
    """
    own = source.image_size
    if data_cfg.image_size:
        size = data_cfg.image_size
        if own is None or own == size:
            return size, f"{size} px (data.image_size)"
        vit = _branch_spec(source, "vit") if "vit" in branches else None
        if vit is not None and "img_size" in vit["timm_kwargs"]:
            if source.kind == "classifier":
                raise ClassifierError(f"data.image_size {size}: the fine-tuned ViT at {source.path} was trained at "
                                      f"{own} px and is evaluated at that size only; drop --image-size")
            patch = vit["timm_kwargs"].get("patch_size")
            if isinstance(patch, int) and size < patch:
                raise BackboneError(f"data.image_size {size}: smaller than one patch ({patch} px) of the ViT exported "
                                    f"at {source.path} (trained at {own} px); use at least {patch}")
            return size, (f"{size} px (data.image_size); the ViT trained at {own} px gets its position embeddings "
                          f"resampled to the new grid")
        return size, f"{size} px (data.image_size; the init was trained at {own} px)"
    if own is not None:
        return own, f"{own} px, the size {source.path} was trained at (set --image-size to change it)"
    if manifest.image.size is None or manifest.image.size[0] != manifest.image.size[1]:
        raise ConfigError(f"data.image_size: the images of {data_cfg.shards} are "
                          f"{manifest.image.size or 'of mixed sizes'}, not one square size; pass --image-size")
    size = int(manifest.image.size[0])
    return size, f"{size} px, the manifest's image size"


def check_init_files(source: InitSource, branches: tuple[str, ...]) -> None:
    """Check, before any work, that the export holds ``branches`` with readable weights; returns None.

    Raises ExportError (a branch the export lacks, an unreadable file), WeightsUnavailableError (a
    missing file), BackboneError (a file holding another model than model.json says).
    """
    if source.kind != "export":
        return
    for branch in branches:
        if branch not in source.info:
            raise ExportError(f"model.init {source.path}: the export holds no {branch!r} branch (it holds "
                              f"{[b for b in ('cnn', 'vit') if b in source.info]}); pass --branch to pick one")
        export_weights(source.path, branch, source.info)


def _branch_spec(source: InitSource, branch: str) -> dict[str, Any] | None:
    if source.kind == "export":
        return source.info.get(branch)
    if source.kind == "classifier":
        return source.info["branches"].get(branch)
    return None


def build_backbone(model_cfg: DownstreamModelSection, branch: str, image_size: int | None = None,
                   source: InitSource | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Return ``(backbone without classifier, spec)`` for one branch; spec = BackboneSpec.to_dict().

    A random / ImageNet backbone is planned for ``image_size`` (small CNN stem at <= 64 px, a ViT
    patch size giving >= 16 tokens; ``model.small_stem`` / ``model.vit_patch_size`` override). An
    export keeps its own stem and patch size; its ViT is rebuilt for ``image_size`` when that differs.
    Raises BackboneError (unknown model or keyword, weights of another architecture),
    WeightsUnavailableError (no export at the init path, or no ImageNet weights offline),
    ExportError (a damaged export or one without this branch).
    """
    source = source or read_init(model_cfg.init)
    if source.kind in BUILTIN_INITS:
        name = model_cfg.cnn if branch == "cnn" else model_cfg.vit
        extra = {**(model_cfg.cnn_kwargs if branch == "cnn" else model_cfg.vit_kwargs), "num_classes": 0}
        # model.small_stem is the CNN's: the ViT keeps its automatic (no-op) choice, so --branch both works
        small_stem = model_cfg.small_stem if branch == "cnn" else None
        spec = plan_backbone(name, num_classes=0, img_size=image_size, small_stem=small_stem,
                             patch_size=model_cfg.vit_patch_size, extra_kwargs=extra)
        backbone = build_from_spec(spec, pretrained=source.kind == "imagenet")
        spec = spec.to_dict()
    elif source.kind == "export":
        backbone = load_backbone(source.path, branch, num_classes=0, img_size=image_size)
        exported = source.info[branch]
        kwargs = {**exported["timm_kwargs"], "num_classes": 0}
        if image_size is not None and "img_size" in kwargs:
            kwargs["img_size"] = image_size
        spec = {"name": exported["name"], "timm_kwargs": kwargs, "small_stem": exported["small_stem"]}
    else:
        raise ClassifierError(f"model.init {source.path}: a fine-tuned classifier, not a pretraining run or export; "
                              f"fine-tune from the run it started from, or evaluate it with --probe head")
    if model_cfg.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone, spec


def classifier_dir(path: Path) -> Path | None:
    """Return the dir holding a saved classifier at ``path`` (itself or its ``best/``), else None."""
    for candidate in (path, path / "best"):
        if (candidate / INFO_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def read_classifier_info(found: Path) -> dict[str, Any]:
    """Return the checked ``classifier.json`` in ``found``; raise ClassifierError when it is damaged."""
    path = found / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClassifierError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(info, dict):
        raise ClassifierError(f"{path}: expected a JSON object, got {type(info).__name__}")
    if info.get("format_version") != FORMAT_VERSION:
        raise ClassifierError(f"{path}: format_version {info.get('format_version')!r}, expected {FORMAT_VERSION}")
    names, task, branches = info.get("class_names"), info.get("task"), info.get("branches")
    if not isinstance(names, list) or not isinstance(task, str) or not isinstance(branches, dict) or not branches:
        raise ClassifierError(f"{path}: expected task, class_names and branches; the file is damaged")
    unknown = sorted(set(branches) - {"cnn", "vit"})
    if unknown:
        raise ClassifierError(f"{path}: unknown branches {unknown} (expected cnn and/or vit)")
    info["branches"] = {b: check_spec(spec, f"{path}: branches.{b}") for b, spec in branches.items()}
    size = info.get("image_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise ClassifierError(f"{path}: image_size must be an integer, got {size!r}")
    return info

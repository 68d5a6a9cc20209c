"""Export the pretrained backbones as plain timm safetensors files, and load them back.

An export directory holds::

    cnn.safetensors   the CNN's timm state dict (metadata: timm_model)
    vit.safetensors   the ViT's timm state dict
    model.json        names, timm keywords to rebuild each branch, embed dim, the exported ``branches``
                      and ``extra`` (config, manifest digest); written last, so its presence means the
                      export is complete

CASS exports both branches; a one-backbone method (DINO) exports only its own (``branches``).

Each file loads in plain timm::

    timm.create_model(name, pretrained=True, **timm_kwargs, pretrained_cfg_overlay=dict(file=path, num_classes=...))

(``num_classes`` in the overlay is needed only to keep a classifier whose size is not 1000.)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from cass_dist.models.backbones import BackboneError, WeightsUnavailableError, create_backbone
from cass_dist.models.cass import CASS

EXPORT_DIR = "export"
MODEL_JSON = "model.json"
EXPORT_FORMAT_VERSION = 1
BRANCHES = ("cnn", "vit")


def export_backbones(model: CASS, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<branch>.safetensors`` per exported branch and ``model.json``; returns their paths by key.

    ``out_dir`` is a run dir (files go to ``out_dir/export/``) or an export dir itself (a path named
    ``export``). ``model`` may be a CASS, a wrapper holding it as ``.model`` (CASSPretrainer), or a
    module with ``export_parts() -> ({branch: backbone}, description)`` (a pretraining method with one
    branch, e.g. DINO); unwrap DDP/Accelerate first. ``model.json`` lists the exported ``branches``.
    ``extra`` must be JSON-serialisable (Paths are written as strings). Every file is written to a
    temporary name and renamed; ``model.json`` last. Raises TypeError for a model that is none of these.
    """
    backbones, description = _export_parts(model)
    out = Path(out_dir)
    export_dir = out if out.name == EXPORT_DIR else out / EXPORT_DIR
    export_dir.mkdir(parents=True, exist_ok=True)
    json_path = export_dir / MODEL_JSON
    json_path.unlink(missing_ok=True)  # until the new one is written, the export is incomplete
    paths: dict[str, Path] = {}
    for branch, backbone in backbones.items():
        path = export_dir / f"{branch}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
        _atomic(path, lambda tmp, state=state, branch=branch: save_file(
            state, tmp, metadata={"format": "pt", "timm_model": description[branch]["name"], "branch": branch}
        ))
        description[branch]["file"] = path.name
        paths[branch] = path
    info = {"format_version": EXPORT_FORMAT_VERSION, **description, "branches": list(backbones), "extra": extra or {}}
    _atomic(json_path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2, default=str) + "\n"))
    paths["model_json"] = json_path
    return paths


def read_export_info(path: str | Path) -> dict[str, Any]:
    """Return the parsed ``model.json`` of the export at ``path`` (run dir, export dir or a file in it).

    Raises WeightsUnavailableError when no complete export is there, ValueError for an unknown format.
    """
    json_path = _export_dir(Path(path)) / MODEL_JSON
    if not json_path.is_file():
        raise WeightsUnavailableError(f"no export at {path}: {json_path} is missing (export incomplete or never made)")
    info = json.loads(json_path.read_text())
    if info.get("format_version") != EXPORT_FORMAT_VERSION:
        raise BackboneError(f"{json_path}: export format_version {info.get('format_version')!r}, expected {EXPORT_FORMAT_VERSION}")
    return info


def load_backbone(
    path: str | Path, branch: str, *, num_classes: int | None = None, expected_model: str | None = None
) -> nn.Module:
    """Return the exported ``branch`` ("cnn" or "vit") backbone as a plain timm model with its weights.

    ``path`` is a run dir, an export dir, or a ``.safetensors`` file with its ``model.json`` beside it.
    ``num_classes`` None keeps the exported classifier (embed_dim, or none for projector heads); another
    value gets a freshly initialised classifier of that size. ``expected_model`` (a timm name) is checked
    against the export.

    Raises:
        WeightsUnavailableError: no complete export, or its weights file is missing.
        BackboneError: the export holds another architecture than ``expected_model`` (or than the file's
            own metadata says), or the weights do not fit.
        ValueError: unknown branch.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    path = Path(path)
    info = read_export_info(path)
    if branch not in info.get("branches", BRANCHES):
        raise WeightsUnavailableError(f"the export at {path} holds only {info['branches']} (method "
                                      f"{info.get('method', 'cass')}), not the {branch!r} branch")
    spec = info[branch]
    weights = path if path.suffix == ".safetensors" else _export_dir(path) / spec["file"]
    if not weights.is_file():
        raise WeightsUnavailableError(f"export weights file {weights} is missing")
    found = _file_model_name(weights) or spec["name"]
    if found != spec["name"]:
        raise BackboneError(f"{weights} holds timm model {found!r} but {MODEL_JSON} says {spec['name']!r}")
    if expected_model is not None and expected_model != found:
        raise BackboneError(f"expected timm model {expected_model!r} but the export at {weights} holds {found!r}")
    kwargs = dict(spec["timm_kwargs"])
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return create_backbone(spec["name"], **kwargs, pretrained_file=weights)


def _export_parts(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The backbones to export by branch and the description that goes into model.json."""
    if hasattr(model, "export_parts"):
        return model.export_parts()
    cass = getattr(model, "model", model)
    if not isinstance(cass, CASS):
        raise TypeError(f"export_backbones needs a CASS model, a module with .model or with export_parts(), "
                        f"got {type(model).__name__}")
    return {branch: getattr(cass, branch) for branch in BRANCHES}, cass.describe()


def _export_dir(path: Path) -> Path:
    if path.suffix == ".safetensors" or path.name == MODEL_JSON:
        return path.parent
    if (path / MODEL_JSON).is_file() or path.name == EXPORT_DIR:
        return path
    return path / EXPORT_DIR


def _file_model_name(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("timm_model")


def _atomic(path: Path, write) -> None:
    """Call ``write(tmp_name)`` on a temporary file beside ``path``, then rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

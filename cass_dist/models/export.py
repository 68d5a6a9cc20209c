"""Export the pretrained backbones as plain timm safetensors files, and load them back.

An export directory holds::

    cnn.safetensors   the CNN's timm state dict (metadata: timm_model)
    vit.safetensors   the ViT's timm state dict
    model.json        names, timm keywords and stem of each branch, the image size, embed dim, the
                      exported ``branches`` and ``extra`` (config, manifest digest); written last, so its
                      presence means the export is complete

CASS exports both branches; a one-backbone method (DINO) exports only its own (``branches``).

Each file loads in plain timm::

    timm.create_model(name, pretrained=True, **timm_kwargs, pretrained_cfg_overlay=dict(file=path, num_classes=...))

(``num_classes`` in the overlay is needed only to keep a classifier whose size is not 1000.) A branch
with ``"small_stem": true`` has a stride-1 3x3 stem instead of timm's: build it, swap the stem, then load::

    model = timm.create_model(name, **timm_kwargs)
    model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file(path))

Keywords read back from model.json reach timm only when they are in ``ALLOWED_TIMM_KWARGS``: a
``checkpoint_path`` or ``pretrained_cfg_overlay`` there would make timm open a file the export names.
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

from cass_dist.models.backbones import build_from_spec
from cass_dist.models.cass import CASS
from cass_dist.models.errors import BackboneError, ExportError, WeightsUnavailableError

EXPORT_DIR = "export"
MODEL_JSON = "model.json"
EXPORT_FORMAT_VERSION = 1
BRANCHES = ("cnn", "vit")
# Architecture keywords an export or a saved classifier may hand to timm.create_model; nothing that
# names a file (checkpoint_path, pretrained_cfg_overlay) or swaps in code (act_layer, block_fn ...).
ALLOWED_TIMM_KWARGS = frozenset({
    "num_classes", "img_size", "patch_size", "in_chans", "drop_rate", "drop_path_rate", "global_pool",
    "depth", "embed_dim", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "class_token", "reg_tokens",
    "no_embed_class", "pos_embed", "init_values", "dynamic_img_size", "dynamic_img_pad", "output_stride",
    "stem_width", "stem_type",
})


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
    """Return the parsed, checked ``model.json`` of the export at ``path`` (run dir, export dir or a file in it).

    Every branch it holds (one or both of ``cnn`` and ``vit``) has a checked spec: a timm name,
    allowed timm keywords (``ALLOWED_TIMM_KWARGS``) and a boolean ``small_stem`` (False when absent).
    Raises WeightsUnavailableError when no complete export is there, ExportError when model.json is
    not JSON, not an object, of an unknown format, or holds a branch spec we refuse.
    """
    json_path = _export_dir(Path(path)) / MODEL_JSON
    if not json_path.is_file():
        raise WeightsUnavailableError(f"no export at {path}: {json_path} is missing (export incomplete or never made)")
    try:
        info = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{json_path}: not valid JSON ({err}); re-export the run") from err
    if not isinstance(info, dict):
        raise ExportError(f"{json_path}: expected a JSON object, got {type(info).__name__}")
    if info.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportError(f"{json_path}: export format_version {info.get('format_version')!r}, expected {EXPORT_FORMAT_VERSION}")
    held = [b for b in BRANCHES if b in info]
    if not held:
        raise ExportError(f"{json_path}: holds no branch (expected one or both of {list(BRANCHES)})")
    for branch in held:
        info[branch] = check_spec(info[branch], f"{json_path}: {branch}")
    return info


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """Return a branch spec read from a file, checked: ``{"name", "timm_kwargs", "small_stem", ...}``.

    ``where`` names the file and field in errors. Raises ExportError for a spec that is not an
    object, a name that is not a string, keywords outside ``ALLOWED_TIMM_KWARGS`` or values that are
    not plain numbers, strings, booleans or lists of numbers.
    """
    if not isinstance(spec, dict):
        raise ExportError(f"{where}: expected an object with name and timm_kwargs, got {type(spec).__name__}")
    name, kwargs = spec.get("name"), spec.get("timm_kwargs", {})
    if not isinstance(name, str) or not name:
        raise ExportError(f"{where}.name: expected a timm model name, got {name!r}")
    if not isinstance(kwargs, dict):
        raise ExportError(f"{where}.timm_kwargs: expected an object, got {type(kwargs).__name__}")
    refused = sorted(set(kwargs) - ALLOWED_TIMM_KWARGS)
    if refused:
        raise ExportError(f"{where}.timm_kwargs: keywords {refused} are not accepted from a file "
                          f"(allowed: {sorted(ALLOWED_TIMM_KWARGS)})")
    for key, value in kwargs.items():
        if not _plain(value):
            raise ExportError(f"{where}.timm_kwargs.{key}: expected a number, string, boolean or list of numbers, "
                              f"got {value!r}")
    small_stem = spec.get("small_stem", False)
    if not isinstance(small_stem, bool):
        raise ExportError(f"{where}.small_stem: expected true or false, got {small_stem!r}")
    return {**spec, "timm_kwargs": dict(kwargs), "small_stem": small_stem}


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def export_image_size(info: dict[str, Any]) -> int | None:
    """Return the image size (px) an export was trained at, or None when its model.json does not say.

    Read from ``image_size`` (exports since the small stem), else the ViT's ``img_size``, else the
    pretraining config in ``extra``.
    """
    def field(data: Any, key: str) -> Any:
        return data.get(key) if isinstance(data, dict) else None

    pretraining = field(field(field(info, "extra"), "config"), "data")
    for value in (info.get("image_size"), field(field(info.get("vit"), "timm_kwargs"), "img_size"),
                  field(pretraining, "image_size")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
            return int(value[0])
    return None


def load_backbone(
    path: str | Path, branch: str, *, num_classes: int | None = None, expected_model: str | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """Return the exported ``branch`` ("cnn" or "vit") backbone as a plain timm model with its weights.

    ``path`` is a run dir, an export dir, or a ``.safetensors`` file with its ``model.json`` beside it.
    ``num_classes`` None keeps the exported classifier (embed_dim, or none for projector heads); another
    value gets a freshly initialised classifier of that size. ``expected_model`` (a timm name) is checked
    against the export. ``img_size`` rebuilds a ViT for another image size: timm resamples its
    position embeddings to the new grid (patch size kept); a CNN ignores it.

    Raises:
        WeightsUnavailableError: no complete export, or its weights file is missing.
        ExportError: a damaged model.json, a branch the export does not hold, refused timm keywords.
        BackboneError: the export holds another architecture than ``expected_model`` (or than the file's
            own metadata says), the weights are damaged or do not fit, or ``img_size`` is smaller than
            one patch.
    """
    if branch not in BRANCHES:
        raise ExportError(f"branch must be one of {BRANCHES}, got {branch!r}")
    path = Path(path)
    info = read_export_info(path)
    if branch not in info:
        raise ExportError(f"{_export_dir(path) / MODEL_JSON}: the export holds no {branch!r} branch "
                          f"(it holds {[b for b in BRANCHES if b in info]}, method {info.get('method', 'cass')})")
    spec = info[branch]
    weights, found = export_weights(path, branch, info)
    if expected_model is not None and expected_model != found:
        raise BackboneError(f"expected timm model {expected_model!r} but the export at {weights} holds {found!r}")
    kwargs = dict(spec["timm_kwargs"])
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None and "img_size" in kwargs and kwargs["img_size"] != img_size:
        patch = kwargs.get("patch_size")
        if isinstance(patch, int) and img_size < patch:
            raise BackboneError(f"--image-size {img_size}: smaller than the exported ViT's patch size {patch} "
                                f"({weights}); use at least {patch}, or the export's own {kwargs['img_size']}")
        kwargs["img_size"] = img_size  # timm's checkpoint filter resamples pos_embed to the new grid
    return build_from_spec({**spec, "timm_kwargs": kwargs}, pretrained_file=weights)


def export_weights(path: str | Path, branch: str, info: dict[str, Any]) -> tuple[Path, str]:
    """Return ``(weights file, timm model it holds)`` of ``branch`` in the export at ``path``, checked.

    Reads only the file's header: cheap enough to check an export before a run starts. Raises
    WeightsUnavailableError (file missing), ExportError (not a readable safetensors file),
    BackboneError (it holds another model than model.json says).
    """
    path, spec = Path(path), info[branch]
    weights = path if path.suffix == ".safetensors" else _export_dir(path) / str(spec.get("file", f"{branch}.safetensors"))
    if not weights.is_file():
        raise WeightsUnavailableError(f"export weights file {weights} is missing")
    found = _file_model_name(weights) or spec["name"]
    if found != spec["name"]:
        raise BackboneError(f"{weights} holds timm model {found!r} but {MODEL_JSON} says {spec['name']!r}")
    return weights, found


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
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("timm_model")
    except Exception as err:  # safetensors' SafetensorError: truncated, or not a safetensors file at all
        raise ExportError(f"{path}: not a readable safetensors file ({err}); the export is damaged, re-export "
                          f"the run") from err


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

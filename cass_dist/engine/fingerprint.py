"""What a checkpoint's position and state mean, recorded with it and checked before a resume.

A checkpoint says "step 40, epoch 1, batch 5" and holds optimizer moments for some parameters. That
means something only for the model, objective, optimizer, data, split, image size, views, seed and
global batch that wrote it: resumed with another ``--batch-size`` the saved position replays other
samples, with another ``--data`` it goes on on another dataset. So each checkpoint carries a
*fingerprint* (a flat ``{name: value}`` dict) and a resume whose fingerprint differs is refused before
anything is written, naming each field with its old and new value. ``--resume-force FIELD,...``
accepts named changes. Everything else in the config (max steps, lr, save interval, logging, workers)
is schedule: allowed, and logged.

The global batch is recorded, not its factors: a job requeued on 4 GPUs instead of 8 with twice the
per-process batch is the same run. To fingerprint one more setting, add its dotted config name to
``PRETRAIN_FIELDS`` / ``FINETUNE_FIELDS``; a name that names a whole section (``method``) stands for
all its fields, and a name the config does not have is skipped, so a field can be listed before it
exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from cass_dist.configs.base import ConfigError, to_dict
from cass_dist.engine.checkpoint import FORCE_FILES

GLOBAL_BATCH = "global_batch"  # data.batch_size x processes x run.grad_accum_steps
DATA_DIGEST = "data.manifest_digest"  # sha256 of the shard set's manifest: the exact dataset
PRETRAIN_FIELDS = (
    "method",  # the pretraining method (CASS, DINO ...); a method other than CASS adds its own section (dino)
    "model.cnn", "model.vit", "model.embed_dim", "model.head", "model.proj_hidden_dim", "model.vit_patch_size",
    "model.small_stem",
    "objective.name", "objective.kwargs", "optim.optimizer",
    "data.train_split", "data.image_size", "data.views", "run.seed",
)
FINETUNE_FIELDS = (
    "model.init", "model.branch", "model.cnn", "model.vit", "model.cnn_kwargs", "model.vit_kwargs",
    "model.small_stem", "model.vit_patch_size",
    "loss.name", "loss.gamma", "loss.class_weights", "loss.alpha", "optim.layer_decay", "early_stop.metric",
    "data.train_split", "data.image_size", "data.label_fraction", "data.fraction_seed", "run.seed",
)
# Never worth a log line: they say how to start, not what the run is.
UNLOGGED = ("run.resume", "run.resume_force")


class ResumeMismatchError(ConfigError):
    """A resume's settings differ from the checkpoint's fingerprint (and were not forced)."""


def _lookup(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        if not hasattr(value, part):
            return dataclasses.MISSING
        value = getattr(value, part)
    return value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return a nested mapping as ``{dotted name: leaf}`` (empty mappings stay leaves)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_fingerprint(cfg: Any, fields: Iterable[str], *, world_size: int, manifest_digest: str) -> dict[str, Any]:
    """Return the fingerprint of ``cfg`` (a config dataclass) for the named ``fields``.

    Adds ``global_batch`` (``data.batch_size`` x ``world_size`` x ``run.grad_accum_steps``) and the
    manifest digest. Values are JSON-able (tuples become lists), as they are stored in train_state.json.
    """
    out: dict[str, Any] = {}
    for name in fields:
        value = _lookup(cfg, name)
        if value is dataclasses.MISSING:
            continue
        if dataclasses.is_dataclass(value):
            out.update(flatten(to_dict(value), f"{name}."))
        else:
            out[name] = _plain(value)
    out[GLOBAL_BATCH] = cfg.data.batch_size * world_size * cfg.run.grad_accum_steps
    out[DATA_DIGEST] = manifest_digest
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def pretrain_fingerprint(cfg: Any, manifest, world_size: int) -> dict[str, Any]:
    """Return the fingerprint of a pretraining run (a PretrainConfig on ``manifest``'s data)."""
    method_fields = (getattr(cfg, "method", "cass"),) if getattr(cfg, "method", "cass") != "cass" else ()
    return config_fingerprint(cfg, PRETRAIN_FIELDS + method_fields, world_size=world_size,
                              manifest_digest=manifest.digest())


def finetune_fingerprint(cfg: Any, manifest, world_size: int) -> dict[str, Any]:
    """Return the fingerprint of a fine-tuning run (a FinetuneConfig on ``manifest``'s data)."""
    return config_fingerprint(cfg, FINETUNE_FIELDS, world_size=world_size, manifest_digest=manifest.digest())


def parse_force(text: str) -> set[str]:
    """Return the field names of ``run.resume_force`` ("a,b" -> {"a", "b"})."""
    return {name.strip() for name in text.split(",") if name.strip()}


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], *, force: Iterable[str] = (),
                 origin: str = "the checkpoint", batch_note: str = "") -> list[str]:
    """Compare a checkpoint's fingerprint with the run's; return log lines for the changes it accepts.

    Fields recorded on both sides are compared; ``force`` names those allowed to differ. A field only
    one side has (fingerprinted by a newer or older cass-dist) cannot be compared and gets a note, as
    does an empty ``saved`` (a checkpoint older than fingerprints). Raises ResumeMismatchError
    naming every differing, unforced field with both values, and ConfigError for a ``force`` name
    that is not a fingerprint field.
    """
    force = set(force)
    known = set(saved) | set(current)
    unknown = sorted(force - known - {FORCE_FILES})
    if unknown:
        raise ConfigError(f"run.resume_force: {unknown} are not fingerprint fields; they are "
                          f"{sorted(known | {FORCE_FILES})}")
    if not saved:
        return [f"{origin} has no fingerprint (saved by an older cass-dist): its settings are not checked"]
    changed = {name: (saved[name], current[name]) for name in sorted(set(saved) & set(current))
               if saved[name] != current[name]}
    refused = [name for name in changed if name not in force]
    if refused:
        what = "; ".join(_change(name, *changed[name], batch_note) for name in refused)
        raise ResumeMismatchError(
            f"resume refused: {origin} was written with other settings: {what}. Resume with the checkpoint's "
            f"values, choose another --output-dir, or accept the change with --resume-force {','.join(refused)}")
    unmatched = sorted(set(saved) ^ set(current))
    return [f"resume: {_change(name, *changed[name], batch_note)} (accepted by --resume-force)" for name in changed] \
        + [f"resume: {name} is not recorded on both sides (another cass-dist version): not checked"
           for name in unmatched]


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], *, skip: Iterable[str] = ()) -> list[str]:
    """Return ``"name old -> new"`` for every flat config value that differs (schedule changes to log)."""
    skip = set(skip) | set(UNLOGGED)
    return [_change(name, saved.get(name), current.get(name)) for name in sorted(set(saved) | set(current))
            if not _under(name, skip) and saved.get(name) != current.get(name)]


def _under(name: str, prefixes: set[str]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or a field inside one (``objective.kwargs.x``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _change(name: str, old: Any, new: Any, batch_note: str = "") -> str:
    note = f" ({batch_note})" if name == GLOBAL_BATCH and batch_note else ""
    return f"{name} {old!r} -> {new!r}{note}"

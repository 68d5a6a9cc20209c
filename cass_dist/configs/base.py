"""Typed-dataclass configs: defaults < preset < YAML file < CLI flags, validated before any work.

A config is a dataclass whose fields are scalars, lists, dicts or nested *section* dataclasses.
This module knows nothing about CASS; it merges, type-checks, validates and saves any such tree.

Adding a config (e.g. ``cass_dist/configs/finetune.py``)::

    @dataclass
    class HeadSection:
        dropout: float = 0.0

        def validate(self) -> None:           # optional; raise FieldError with the field's own name
            if not 0 <= self.dropout < 1:
                raise FieldError("dropout", "must be in [0, 1)", self.dropout)

    @dataclass
    class FinetuneConfig:
        run: RunSection = field(default_factory=RunSection)   # shared: output dir, steps, precision, ...
        head: HeadSection = field(default_factory=HeadSection)

    PRESETS = {"small": lambda: FinetuneConfig(head=HeadSection(dropout=0.1))}
    ALIASES = {**RUN_ALIASES, "--dropout": "head.dropout"}
    cfg = parse_config(FinetuneConfig, argv, presets=PRESETS, aliases=ALIASES)

Every leaf is then settable as ``--head.dropout 0.2`` (``-`` or ``_`` alike), in YAML as
``head: {dropout: 0.2}``, and through the short aliases. Literal[...] fields check their choices;
errors name the dotted field (``optim.lr_cnn: must be > 0, got -1``). ``save_config`` writes the
resolved tree as YAML; ``load_config`` reads it back to an equal config.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from cass_dist.configs.fielddocs import field_comments, flag_help
from cass_dist.errors import CassError

C = TypeVar("C")


class ConfigError(CassError, ValueError):
    """A config value, file or flag is invalid; the message names the dotted field."""

    exit_code = 2


class FieldError(ConfigError):
    """Raised by a section's ``validate``; the walker prefixes the section path to ``name``."""

    def __init__(self, name: str, expected: str, value: Any = dataclasses.MISSING):
        self.name, self.expected, self.value = name, expected, value
        got = "" if value is dataclasses.MISSING else f", got {value!r}"
        super().__init__(f"{name}: {expected}{got}")


@dataclass
class RunSection:
    """What every training job shares (pretraining and fine-tuning alike)."""

    output_dir: str = "runs/cass"  # the run directory: config.yaml, metrics.jsonl, checkpoints/, export/
    seed: int = 0  # seeds every RNG and the data order; part of a checkpoint's fingerprint
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on >=8.0 GPUs, fp16 on 7.x, fp32 on CPU
    report_to: Literal["none", "wandb", "tensorboard"] = "none"  # trackers; metrics.jsonl is always written
    project: str = "cass-dist"  # W&B / TensorBoard project name
    run_name: str = ""  # display name in W&B ("": W&B picks one)
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: int = 1  # passes over the training split, used when max_steps is 0
    min_steps: int = 0  # with max_steps 0: at least this many optimizer steps, however short an epoch is
    grad_accum_steps: int = 1  # micro-batches per optimizer step (global batch = batch x processes x this)
    clip_grad: float = 0.0  # max global grad norm; 0 = off
    warmup_steps: int = 0  # optimizer steps of linear lr warmup before the cosine decay
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    resume: str = ""  # "", "auto" (newest complete checkpoint, if any) or a checkpoint dir
    # comma-separated fingerprint fields a resume may change (e.g. "global_batch,optim.optimizer");
    # a resume that changes any other one is refused (see engine/fingerprint.py)
    resume_force: str = ""
    log_every: int = 10  # optimizer steps between metrics.jsonl / tracker records
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row

    def validate(self) -> None:
        for name in ("max_steps", "min_steps", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise FieldError(name, "must be >= 0", getattr(self, name))
        for name in ("grad_accum_steps", "keep_last", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise FieldError(name, "must be >= 1", getattr(self, name))
        if self.max_steps == 0 and self.epochs < 1:
            raise FieldError("epochs", "must be >= 1 when max_steps is 0", self.epochs)
        if self.clip_grad < 0:
            raise FieldError("clip_grad", "must be >= 0 (0 disables clipping)", self.clip_grad)
        if not 0 <= self.min_lr_ratio <= 1:
            raise FieldError("min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        if not self.output_dir:
            raise FieldError("output_dir", "must not be empty")


# Short flags every training entry point offers; a config adds its own on top.
RUN_ALIASES = {
    "--output-dir": "run.output_dir", "--seed": "run.seed", "--precision": "run.precision",
    "--report-to": "run.report_to", "--max-steps": "run.max_steps", "--epochs": "run.epochs",
    "--min-steps": "run.min_steps", "--save-every": "run.save_every", "--keep-last": "run.keep_last",
    "--resume": "run.resume",
    "--grad-accum-steps": "run.grad_accum_steps", "--clip-grad": "run.clip_grad",
    "--warmup-steps": "run.warmup_steps", "--log-every": "run.log_every", "--run-name": "run.run_name",
    "--resume-force": "run.resume_force",
}


# ----------------------------------------------------------------------------- typing and merging
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` converted to type ``tp``; raise ConfigError naming ``name``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: expected {tp}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if origin is tuple and args and len(args) != len(value):
            raise ConfigError(f"{name}: expected {len(args)} values, got {value!r}")
        items = [_coerce(v, args[i] if origin is tuple else (args or [Any])[0], f"{name}[{i}]")
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_section(tp):
        raise ConfigError(f"{name}: is a section; set its fields ({name}.<field>), got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp}")


def merge(cfg: C, data: Mapping[str, Any], prefix: str = "") -> C:
    """Return a copy of ``cfg`` with the nested mapping ``data`` applied; raise ConfigError on unknown or mistyped fields."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(type(cfg))
    changes = {}
    for key, value in data.items():
        key_norm = str(key).replace("-", "_")
        name = f"{prefix}{key_norm}"
        if key_norm not in hints:
            close = difflib.get_close_matches(key_norm, list(hints), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {sorted(hints)}"
            raise ConfigError(f"{name}: unknown field{hint}")
        tp = hints[key_norm]
        if _is_section(tp):
            changes[key_norm] = merge(getattr(cfg, key_norm), value, f"{name}.")
        else:
            changes[key_norm] = _coerce(value, tp, name)
    return dataclasses.replace(cfg, **changes)


def validate(cfg: Any, prefix: str = "") -> None:
    """Run every section's ``validate`` (innermost first); raise ConfigError naming the dotted field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except FieldError as exc:
            raise ConfigError(f"{prefix}{exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config as plain YAML-able data (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------- files
def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Return the mapping in a YAML file; raise ConfigError when it is missing, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML atomically (temp name, then rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_config(cls: type[C], path: str | os.PathLike) -> C:
    """Return a validated ``cls`` read from a YAML file over the class defaults; raise ConfigError."""
    data = read_yaml(path)
    data.pop("preset", None)
    cfg = merge(cls(), data)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- command line
def _leaves(cls: type, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            out.update(_leaves(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


def _parse_flag_value(raw: str, tp: Any) -> Any:
    # Strings stay verbatim (a run name "1e-3" must stay a string); everything else is YAML ("3", "[1, 2]", "true").
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def _leaf_comments(cls: type, prefix: str = "") -> dict[str, str]:
    out = {}
    comments = field_comments(cls)
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            out.update(_leaf_comments(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = comments.get(name, "")
    return out


def _default_of(defaults: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        defaults = getattr(defaults, part)
    return defaults


def field_meanings(cls: type) -> dict[str, str]:
    """Return ``{dotted field: what it means}`` for every leaf of a config class ("" when uncommented)."""
    return _leaf_comments(cls)


def build_parser(cls: type, aliases: Mapping[str, str], presets: Mapping[str, Any], prog: str | None = None
                 ) -> argparse.ArgumentParser:
    """Return the argparse parser: --config, --preset, one flag per leaf field, and the short aliases.

    Each flag's help is the field's source comment (see ``configs/fielddocs.py``), its type and default.
    """
    description = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, usage="%(prog)s [--preset NAME] [--config FILE] [--section.field V ...]",
        description=f"{description} Values merge as: defaults < --preset < --config YAML < flags; every "
                    f"field is a flag --section.field (dashes or underscores), short aliases beside it.")
    parser.add_argument("--config", metavar="FILE", help="a YAML file of sections and fields (a run's config.yaml "
                        "works); flags given here override it")
    choices = ", ".join(f"{name} ({(fn.__doc__ or '').strip().splitlines()[0].rstrip('.')})" if fn.__doc__ else name
                        for name, fn in sorted(presets.items()))
    parser.add_argument("--preset", metavar="NAME", help=f"start from a named preset: {choices or 'none'}"
                        .replace("%", "%%"))
    leaves = _leaves(cls)
    meanings = _leaf_comments(cls)
    defaults = cls()
    by_target: dict[str, list[str]] = {}
    for flag, target in aliases.items():
        if target not in leaves:
            raise ConfigError(f"alias {flag}: {target} is not a field of {cls.__name__}")
        by_target.setdefault(target, []).append(flag)
    for dotted, tp in leaves.items():
        flags = [f"--{dotted}"] + ([f"--{dotted.replace('_', '-')}"] if "_" in dotted else [])
        flags += by_target.get(dotted, [])
        kwargs: dict[str, Any] = {"dest": f"set:{dotted}", "default": argparse.SUPPRESS, "metavar": "V"}
        if tp is bool:  # "--flag" alone means true; "--flag false" also works
            kwargs.update(nargs="?", const="true")
        parser.add_argument(*flags, help=flag_help(meanings[dotted], tp, _default_of(defaults, dotted)), **kwargs)
    return parser


def parse_config(cls: type[C], argv: Sequence[str] | None, *, presets: Mapping[str, Callable[[], C]],
                 aliases: Mapping[str, str] = RUN_ALIASES, default_preset: str | None = None,
                 prog: str | None = None) -> C:
    """Return a validated config: class defaults < preset < --config YAML < flags.

    A YAML file may name its own ``preset:``; ``--preset`` on the command line wins over it.
    Raises ConfigError for unknown flags or fields, bad types, failed checks and unknown presets.
    """
    parser = build_parser(cls, aliases, presets, prog)
    ns, unknown = parser.parse_known_args(list(argv) if argv is not None else None)
    if unknown:
        known = [o for a in parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        raise ConfigError(f"unknown argument {unknown[0]!r}" + (f"; did you mean {close[0]}?" if close else ""))
    file_data = read_yaml(ns.config) if ns.config else {}
    preset = ns.preset or file_data.pop("preset", None) or default_preset
    file_data.pop("preset", None)
    if preset is not None and preset not in presets:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {sorted(presets)}")
    cfg = presets[preset]() if preset else cls()
    cfg = merge(cfg, file_data)
    leaves = _leaves(cls)
    flag_data: dict[str, Any] = {}
    for key, raw in vars(ns).items():
        if key.startswith("set:"):
            dotted = key[4:]
            _set_dotted(flag_data, dotted, _parse_flag_value(raw, leaves[dotted]))
    cfg = merge(cfg, flag_data)
    validate(cfg)
    return cfg

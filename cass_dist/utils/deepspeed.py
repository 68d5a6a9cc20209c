"""DeepSpeed is an optional extra: find it, or say exactly how to install it."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from cass_dist.configs.base import ConfigError
from cass_dist.errors import CassError

INSTALL_HINT = 'pip install "cass-dist[deepspeed]"'
# Accelerate (1.x) reads transformers' version whenever a DeepSpeed plugin is selected, even for ZeRO-2,
# and fails with PackageNotFoundError when it is absent; so the extra needs it too.
COMPANIONS = ("transformers",)
# Values Accelerate would have to infer from the DataLoader; our loader is an IterableDataset, so
# "auto" there cannot be resolved (or is resolved wrongly) and must not appear.
EXPLICIT_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DeepSpeedUnavailableError(CassError, ImportError):
    """DeepSpeed was asked for (a DeepSpeed config or distributed type) but cannot be imported."""


def require_deepspeed(reason: str = "this run uses DeepSpeed") -> ModuleType:
    """Return the imported ``deepspeed`` module.

    Raises DeepSpeedUnavailableError (an ImportError) naming ``reason`` and the install command
    when deepspeed is missing or fails to import, or when a package Accelerate needs beside it
    (transformers) is not installed.
    """
    try:
        module = importlib.import_module("deepspeed")
    except ImportError as exc:
        raise DeepSpeedUnavailableError(
            f"{reason}, but DeepSpeed is not installed ({exc}). Install the extra with: {INSTALL_HINT}"
        ) from exc
    for name in COMPANIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise DeepSpeedUnavailableError(
                f"{reason}: DeepSpeed is installed but {name!r} is not, and Accelerate needs it to run "
                f"DeepSpeed. Install the extra with: {INSTALL_HINT}"
            ) from exc
    return module


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """Return the DeepSpeed JSON config at ``path``, checked for what cass-dist relies on.

    Raises FileNotFoundError when the file is missing, and ValueError (naming the file and the key)
    when it is not a JSON object, when the micro-batch size or gradient accumulation is missing,
    "auto" or not a positive integer, or when the ZeRO stage is not 0-3.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # missing, unreadable, not JSON
        raise ConfigError(f"{path}: cannot read the DeepSpeed config ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for key in EXPLICIT_KEYS:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{path}: {key} must be an explicit positive integer (not 'auto': the "
                             f"cass-dist loader is an IterableDataset), got {value!r}")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return config


def check_deepspeed_matches(config: dict[str, Any], *, batch_size: int, grad_accum_steps: int,
                            origin: str = "DeepSpeed config") -> None:
    """Check that a DeepSpeed config agrees with the run's per-process batch size and accumulation.

    DeepSpeed steps its optimizer every ``gradient_accumulation_steps`` micro-batches and reports
    throughput from ``train_micro_batch_size_per_gpu``; a mismatch with the loop silently changes
    the effective batch. Returns None; raises ValueError naming ``origin`` and both values.
    """
    pairs = (("train_micro_batch_size_per_gpu", batch_size, "data.batch_size"),
             ("gradient_accumulation_steps", grad_accum_steps, "run.grad_accum_steps"))
    for key, expected, field in pairs:
        if config.get(key) != expected:
            raise ConfigError(f"{origin}: {key} is {config.get(key)!r} but {field} is {expected}; "
                             f"make them equal (edit the JSON or pass the flag)")


def deepspeed_requested() -> bool:
    """Return True when ``accelerate launch`` was told to use DeepSpeed (a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def check_launch(*, batch_size: int, grad_accum_steps: int) -> None:
    """Before any work, when DeepSpeed was requested: import it and check its JSON against the run.

    Returns None (and does nothing without DeepSpeed); raises DeepSpeedUnavailableError or ValueError.
    """
    if not deepspeed_requested():
        return
    require_deepspeed()
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.endswith(".json"):
        check_deepspeed_matches(load_deepspeed_config(path), batch_size=batch_size,
                                grad_accum_steps=grad_accum_steps, origin=path)

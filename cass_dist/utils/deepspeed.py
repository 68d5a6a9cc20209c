"""DeepSpeed is an optional extra: find it, or say exactly how to install it; check what a launch asks for.

Refused at launch, with the reason (docs/distributed.md):

- ZeRO-3 and FSDP: they shard the parameters, and the exports, the kNN monitor and validation here
  read whole parameters on one rank; nothing tests them, so they are not offered.
- DeepSpeed with gradient accumulation: Accelerate steps the engine inside the last micro-batch's
  backward, so a window whose earlier micro-batches the non-finite guard would skip still steps on
  partial gradients. Raise the per-GPU batch or the process count instead.
- ``gradient_clipping`` (DeepSpeed clips from its config) different from ``run.clip_grad``.
- DeepSpeed with ``ACCELERATE_USE_CPU`` set: Accelerate then ignores DeepSpeed and trains plain DDP.
"""

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


class LaunchConfigError(ConfigError):
    """The launch (Accelerate / DeepSpeed config) asks for something cass-dist refuses or disagrees with the run."""


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

    Raises FileNotFoundError when the file is missing, and LaunchConfigError (a ValueError naming the
    file and the key) when it is not a JSON object, when the micro-batch size or gradient accumulation
    is missing, "auto" or not a positive integer, or when the ZeRO stage is not 0-2.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # missing, unreadable, not JSON
        raise LaunchConfigError(f"{path}: cannot read the DeepSpeed config ({exc})") from exc
    if not isinstance(config, dict):
        raise LaunchConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for key in EXPLICIT_KEYS:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LaunchConfigError(f"{path}: {key} must be an explicit positive integer (not 'auto': the "
                                    f"cass-dist loader is an IterableDataset), got {value!r}")
    check_zero_stage(config.get("zero_optimization", {}).get("stage", 0), origin=str(path))
    return config


def check_zero_stage(stage: Any, *, origin: str) -> None:
    """Return None for ZeRO stage 0, 1 or 2; raise LaunchConfigError naming ``origin`` otherwise (3 included)."""
    if stage == 3:
        raise LaunchConfigError(f"{origin}: zero_optimization.stage 3 is not supported: it shards the parameters, "
                                f"and the exports, kNN and validation read whole parameters; use stage 2")
    if stage not in (0, 1, 2):
        raise LaunchConfigError(f"{origin}: zero_optimization.stage must be 0, 1 or 2, got {stage!r}")


def check_deepspeed_matches(config: dict[str, Any], *, batch_size: int, grad_accum_steps: int, clip_grad: float,
                            origin: str = "DeepSpeed config") -> None:
    """Check that a DeepSpeed config agrees with the run's per-process batch, accumulation and clipping.

    DeepSpeed steps its optimizer every ``gradient_accumulation_steps`` micro-batches, reports
    throughput from ``train_micro_batch_size_per_gpu`` and clips at ``gradient_clipping`` (absent: no
    clipping) whatever ``run.clip_grad`` says; a mismatch would silently change the run. Returns None;
    raises LaunchConfigError naming ``origin`` and both values.
    """
    pairs = (("train_micro_batch_size_per_gpu", config.get("train_micro_batch_size_per_gpu"), batch_size,
              "data.batch_size"),
             ("gradient_accumulation_steps", config.get("gradient_accumulation_steps"), grad_accum_steps,
              "run.grad_accum_steps"),
             ("gradient_clipping", _clipping(config.get("gradient_clipping", 0.0)), float(clip_grad), "run.clip_grad"))
    for key, got, expected, field in pairs:
        if got != expected:
            raise LaunchConfigError(f"{origin}: {key} is {got!r} but {field} is {expected}; "
                                    f"make them equal (edit the JSON or pass the flag)")


def _clipping(value: Any) -> Any:
    """DeepSpeed's effective clipping for a config value: Accelerate fills "auto" with its env value or 1.0."""
    if value == "auto":
        value = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
        return 1.0 if value == "auto" else _clipping(value)
    try:
        return float(value) if not isinstance(value, bool) else value
    except (TypeError, ValueError):
        return value  # reported as is by the caller


def deepspeed_requested() -> bool:
    """Return True when ``accelerate launch`` was told to use DeepSpeed (a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def check_launch(*, batch_size: int, grad_accum_steps: int, clip_grad: float) -> None:
    """Before any work: refuse FSDP, and when DeepSpeed was requested import it and check it against the run.

    The DeepSpeed config is the JSON file the launch names, or the values ``accelerate launch`` passes
    inline (environment). Returns None (nothing to check without DeepSpeed); raises
    DeepSpeedUnavailableError or LaunchConfigError (see the module docstring for what is refused).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise LaunchConfigError("the launch config asks for FSDP, which cass-dist does not support (exports, kNN "
                                "and validation read whole parameters); use DDP or DeepSpeed ZeRO-2 "
                                "(launch/configs/deepspeed_zero2.yaml)")
    if not deepspeed_requested():
        return
    require_deepspeed()
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        raise LaunchConfigError("ACCELERATE_USE_CPU is set, and Accelerate then skips DeepSpeed without a word: the "
                                "run would train as plain DDP and write DDP checkpoints; unset it (on a machine "
                                "without CUDA DeepSpeed runs on gloo by itself)")
    if grad_accum_steps > 1:
        raise LaunchConfigError(f"run.grad_accum_steps: {grad_accum_steps} under DeepSpeed is refused: the engine "
                                f"steps inside the last micro-batch's backward, so a window the non-finite guard "
                                f"skips would still step on partial gradients; use 1 and raise data.batch_size or "
                                f"the process count, or use DDP")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path.endswith(".json"):
        check_deepspeed_matches(load_deepspeed_config(path), batch_size=batch_size,
                                grad_accum_steps=grad_accum_steps, clip_grad=clip_grad, origin=path)
        return
    origin = "accelerate config (deepspeed_config)"
    check_zero_stage(int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2)), origin=origin)
    clipping = _clipping("auto")  # inline: what `accelerate launch` passed, else Accelerate's 1.0
    if clipping != float(clip_grad):
        raise LaunchConfigError(f"{origin}: gradient_clipping is {clipping!r} but run.clip_grad is {float(clip_grad)}; "
                                f"make them equal")

"""Atomic, resumable checkpoints: ``checkpoints/step-XXXXXXX/`` written by ``accelerator.save_state``.

A checkpoint holds what Accelerate saves (model, optimizer, AMP scaler, every rank's RNG states)
plus ``train_state.json``: the loop position, the run's fingerprint and config (see
``engine/fingerprint.py``) and the sha256 of every other file of the checkpoint. It is written into
``.tmp-step-XXXXXXX`` and renamed once every rank has finished, so any directory named
``step-XXXXXXX`` is complete; an interrupted save leaves only a temp directory that is ignored and
cleared by the next save. The learning rate is a pure function of the global step (see
``engine/pretrain.py``), so restoring the step restores the schedule.

What a load unpickles. Accelerate 1.15 reads the model from safetensors and the optimizer, scaler and
RNG files with ``torch.load(weights_only=True)`` (tensors, containers and numpy arrays only).
DeepSpeed's checkpoint engine calls ``torch.load(weights_only=False)``; ``load_checkpoint`` gives it a
weights_only loader that allows only the few DeepSpeed classes its ZeRO files hold. Before anything is
loaded, every file is checked against the digests in ``train_state.json``: a damaged file, or one this
run did not write, is refused. That catches damage and foreign files, not an attacker who can also
rewrite ``train_state.json``: a checkpoint directory must be as trusted as the code that reads it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import re
import shutil
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cass_dist.errors import CassError

STATE_FILE = "train_state.json"
_NAME = re.compile(r"^step-(\d{7,})$")
# What DeepSpeed's ZeRO optimizer files pickle besides tensors (deepspeed 0.15-0.19): harmless state
# holders, the only classes its weights_only loader may rebuild.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
FORCE_FILES = "checkpoint_files"  # --resume-force name that skips the file digest check
log = logging.getLogger("cass_dist")


class CheckpointError(CassError, RuntimeError):
    """A checkpoint to resume from is missing, incomplete, damaged or unreadable."""


@dataclass
class TrainState:
    """Loop position saved with every checkpoint (plain JSON, readable without torch)."""

    global_step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed per process
    # the data position in ``epoch``: global samples consumed and the loader layouts that consumed them
    # (cass_dist.data.position); a resume on another number of processes goes on from it exactly
    data_position: dict[str, Any] = field(default_factory=dict)
    nonfinite_steps: int = 0  # total steps skipped for a non-finite loss
    overflow_steps: int = 0  # total steps the fp16 loss scaler skipped (gradients overflowed its scale)
    extra: dict[str, Any] = field(default_factory=dict)  # free space for other loops (fine-tuning: best metric...)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what gives the position meaning (engine/fingerprint.py)
    config: dict[str, Any] = field(default_factory=dict)  # the run's flat config when saved: changes are logged
    files: dict[str, str] = field(default_factory=dict)  # sha256 of every other file of the checkpoint

    @classmethod
    def from_dict(cls, data: Any, origin: str = STATE_FILE) -> TrainState:
        """Return a TrainState from its JSON form; raise CheckpointError naming the bad field."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise CheckpointError(f"{origin}: unknown fields {unknown}; written by another program or version?")
        for name, value in data.items():
            kind = typing.get_origin(hints[name]) or hints[name]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise CheckpointError(f"{origin}: {name} must be a non-negative integer, got {value!r}")
            if kind is not int and isinstance(kind, type) and not isinstance(value, kind):
                raise CheckpointError(f"{origin}: {name} must be a {kind.__name__}, got {value!r}")
        return cls(**data)


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Return ``(step, path)`` of every complete checkpoint, oldest first (temp directories are skipped)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest(checkpoints_dir: str | os.PathLike) -> Path | None:
    """Return the newest complete checkpoint under ``checkpoints_dir``, or None when there is none."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, checkpoints_dir: str | os.PathLike) -> Path | None:
    """Turn ``--resume`` into a checkpoint path.

    ``""`` -> None (fresh start); ``"auto"`` -> the newest complete checkpoint or None when there is
    none yet (so a requeued job and a first start use the same command); anything else is a path
    that must be a complete checkpoint. Raises CheckpointError for a bad path.
    """
    if not resume:
        return None
    if resume == "auto":
        return find_latest(checkpoints_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: {STATE_FILE} is missing; not a complete cass-dist checkpoint")
    return path


def read_train_state(path: str | os.PathLike) -> TrainState:
    """Return the TrainState stored in a checkpoint directory; raise CheckpointError when unreadable."""
    file = Path(path) / STATE_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise CheckpointError(f"{file}: cannot read the train state ({exc})") from exc
    return TrainState.from_dict(data, origin=str(file))


# ----------------------------------------------------------------------------- file digests
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entries(root: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel != STATE_FILE and not path.is_dir():
            yield rel, path


def file_digests(checkpoint_dir: str | os.PathLike) -> dict[str, str]:
    """Return ``{relative path: sha256}`` of every file in the checkpoint except ``train_state.json``."""
    return {rel: _sha256(path) for rel, path in _entries(Path(checkpoint_dir))}


def check_files(checkpoint_dir: str | os.PathLike, recorded: dict[str, str]) -> list[str]:
    """Return what differs between the checkpoint's files and ``recorded`` digests (empty: all match).

    Missing, changed, extra (not written by the run) and non-regular files (links) are all reported.
    """
    root = Path(checkpoint_dir)
    problems, seen = [], set()
    for rel, path in _entries(root):
        seen.add(rel)
        if path.is_symlink() or not path.is_file():
            problems.append(f"{rel} is not a regular file")
        elif rel not in recorded:
            problems.append(f"{rel} was not written by this run")
        elif _sha256(path) != recorded[rel]:
            problems.append(f"{rel} is damaged or was replaced (sha256 differs from {STATE_FILE})")
    problems += [f"{rel} is missing" for rel in sorted(set(recorded) - seen)]
    return problems


def verify_before_load(accelerator, path: Path, state: TrainState, *, force: bool = False) -> None:
    """Check the checkpoint's files against ``state.files`` on the main process; every rank gets the verdict.

    Call on every rank. A checkpoint saved before digests were recorded is accepted with a warning
    unless it is a DeepSpeed one (DeepSpeed unpickles its files): that needs ``force``. Raises
    CheckpointError naming the files.
    """
    from accelerate.utils import DistributedType, broadcast_object_list

    warn = log.warning if accelerator.is_main_process else log.debug
    if force:
        warn(f"{path}: file digests not checked (--resume-force {FORCE_FILES})")
        return
    if not state.files:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise CheckpointError(
                f"{path}: no file digests in {STATE_FILE} (saved by an older cass-dist), and DeepSpeed unpickles "
                f"its files; if you trust this directory, resume with --resume-force {FORCE_FILES}")
        warn(f"{path}: no file digests in {STATE_FILE} (saved by an older cass-dist); files not checked")
        return
    verdict = [check_files(path, state.files) if accelerator.is_main_process else None]
    problems = broadcast_object_list(verdict)[0]
    if problems:
        raise CheckpointError(f"{path}: refused before loading: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- save and load
def save_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, state: TrainState, *,
                    keep_last: int) -> Path:
    """Save the full training state atomically as ``step-XXXXXXX``; keep the newest ``keep_last``.

    Must be called on every rank (DeepSpeed shards and per-rank RNG states are saved by each).
    The checkpoint directory is assumed to be on a file system all ranks share. Records the sha256
    of every file in ``state.files``. Returns the path.
    """
    root = Path(checkpoints_dir)
    final = root / checkpoint_name(state.global_step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.files = file_digests(tmp)
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump(asdict(state), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            old = root / f".old-{final.name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune(checkpoints_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and stale temp dirs; return what was deleted."""
    found = list_checkpoints(checkpoints_dir)
    doomed = [p for _, p in found[:-keep_last]] if keep_last > 0 else []
    # Temp dirs of saves that died half-way (SIGKILL during save_state) are garbage by now.
    doomed += [p for p in Path(checkpoints_dir).glob(".tmp-step-*") if p.is_dir()]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def weights_only_load(path, map_location=None):
    """``torch.load`` with the weights_only unpickler, allowing ``DEEPSPEED_SAFE_GLOBALS``; return the object."""
    allowed = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class cannot be in its files
            continue
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextmanager
def _deepspeed_loads_weights_only(accelerator) -> Iterator[None]:
    """Make the prepared DeepSpeed engines' checkpoint engines unpickle with ``weights_only_load``."""
    patched = []
    for model in getattr(accelerator, "_models", []):
        engine = getattr(model, "checkpoint_engine", None)
        if engine is not None and type(engine).__name__ == "TorchCheckpointEngine":
            engine.load = weights_only_load  # an instance attribute: shadows the class method for this load
            patched.append(engine)
    if patched:
        log.info("DeepSpeed checkpoint files are loaded with torch's weights_only unpickler")
    try:
        yield
    finally:
        for engine in patched:
            del engine.load


def load_checkpoint(accelerator, path: str | os.PathLike, *, force_files: bool = False) -> TrainState:
    """Restore model, optimizer, scaler and RNG states from ``path`` on every rank; return its TrainState.

    The files are checked against their recorded digests first (``force_files`` skips that).
    Raises CheckpointError when the directory is not a complete, intact checkpoint of a matching
    model (the message names the file or the mismatch).
    """
    from safetensors import SafetensorError

    path = Path(path)
    state = read_train_state(path)
    verify_before_load(accelerator, path, state, force=force_files)
    try:
        with _deepspeed_loads_weights_only(accelerator):
            accelerator.load_state(str(path))
    except torch.OutOfMemoryError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{path}: cannot restore the training state ({type(exc).__name__}: "
                              f"{detail[:500]})") from exc
    return state

"""Atomic, resumable checkpoints: ``checkpoints/step-XXXXXXX/`` written by ``accelerator.save_state``.

A checkpoint holds what Accelerate saves (model, optimizer, AMP scaler, every rank's RNG states)
plus ``train_state.json`` (global step, epoch, batch within the epoch: the data position). It is
written into ``.tmp-step-XXXXXXX`` and renamed once every rank has finished, so any directory named
``step-XXXXXXX`` is complete; an interrupted save leaves only a temp directory that is ignored and
cleared by the next save. The learning rate is a pure function of the global step (see
``engine/pretrain.py``), so restoring the step restores the schedule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cass_dist.errors import CassError

STATE_FILE = "train_state.json"
_NAME = re.compile(r"^step-(\d{7,})$")


class CheckpointError(CassError, RuntimeError):
    """A checkpoint to resume from is missing, incomplete or unreadable."""


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
    extra: dict[str, Any] = field(default_factory=dict)  # free space for other loops (fine-tuning: best metric...)

    @classmethod
    def from_dict(cls, data: dict, origin: str = STATE_FILE) -> TrainState:
        """Return a TrainState from its JSON form; raise CheckpointError naming the bad field."""
        try:
            return cls(**data)
        except TypeError as exc:
            raise CheckpointError(f"{origin}: unexpected or missing fields ({exc})") from exc


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
        return TrainState.from_dict(json.loads(file.read_text()), origin=str(file))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read the train state ({exc})") from exc


def save_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, state: TrainState, *,
                    keep_last: int) -> Path:
    """Save the full training state atomically as ``step-XXXXXXX``; keep the newest ``keep_last``.

    Must be called on every rank (DeepSpeed shards and per-rank RNG states are saved by each).
    The checkpoint directory is assumed to be on a file system all ranks share. Returns the path.
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
    if accelerator.is_main_process:
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


def load_checkpoint(accelerator, path: str | os.PathLike) -> TrainState:
    """Restore model, optimizer, scaler and RNG states from ``path`` on every rank; return its TrainState.

    Raises CheckpointError when the directory is not a complete checkpoint.
    """
    state = read_train_state(path)
    try:
        accelerator.load_state(str(path))
    except (FileNotFoundError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot restore the training state ({exc})") from exc
    return state

"""The Run: one training job's Accelerator, precision, run directory, trackers, signals and checkpoints.

Every loop (pretraining, fine-tuning) makes one Run and carries it; nothing here is global. A run
directory looks like::

    <output_dir>/config.yaml        the resolved config of the latest (successful) start
    <output_dir>/metrics.jsonl      one JSON record per logging step (always written)
    <output_dir>/checkpoints/step-XXXXXXX/
    <output_dir>/export/            backbones for downstream use
    <output_dir>/wandb_id           the W&B run id (WANDB_RUN_ID wins when set), reused when the run resumes

A resume changes nothing in the run dir until the checkpoint has been checked and loaded.

Typical use::

    run = Run(cfg.run, config=cfg)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    state = run.resume(pretrain_fingerprint(cfg, manifest, run.accelerator.num_processes))
    while ...:
        ...
        run.log(state.global_step, {"loss": ...})
        if run.should_stop():                   # SIGTERM / SIGUSR1 on any rank, agreed by all ranks
            run.save(state); break
    run.finish()
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from cass_dist.configs.base import ConfigError, RunSection, save_config, to_dict
from cass_dist.engine.checkpoint import (
    FORCE_FILES,
    CheckpointError,
    TrainState,
    find_latest,
    load_checkpoint,
    read_train_state,
    resolve_resume,
    save_checkpoint,
)
from cass_dist.engine.fingerprint import check_resume, config_changes, flatten, parse_force
from cass_dist.engine.trackers import start_trackers, truncate_metrics
from cass_dist.engine.trackers import wandb_offline_reason as _wandb_offline_reason  # noqa: F401 (tests)
from cass_dist.errors import CassError
from cass_dist.utils.deepspeed import deepspeed_requested
from cass_dist.utils.distributed import agree_any

log = logging.getLogger("cass_dist")
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def choose_precision(requested: str = "auto") -> tuple[str, str]:
    """Return ``(precision, why)`` with precision one of "bf16", "fp16", "fp32".

    ``auto`` picks bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 with loss scaling
    on 7.x (T4, V100), and fp32 on older GPUs and on CPU. An explicit request is returned as is.
    Raises ConfigError (a ValueError) for an unknown request.
    """
    if requested in ("bf16", "fp16", "fp32"):
        return requested, f"{requested} as requested"
    if requested != "auto":
        raise ConfigError(f"run.precision: must be auto, bf16, fp16 or fp32, got {requested!r}")
    if not torch.cuda.is_available():
        return "fp32", "fp32: no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        return "bf16", f"bf16: GPU compute capability {major}.{minor} supports it natively"
    if major == 7:
        return "fp16", (f"fp16 with dynamic loss scaling: GPU compute capability {major}.{minor} has no "
                        "native bf16 (T4/V100); non-finite steps are skipped by the scaler")
    return "fp32", f"fp32: GPU compute capability {major}.{minor} is too old for fast half precision"


def _process_group_kwargs() -> list:
    """DeepSpeed without CUDA: name gloo, or Accelerate picks no backend and every rank trains alone."""
    if deepspeed_requested() and not torch.cuda.is_available():
        from accelerate.utils import InitProcessGroupKwargs

        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def launch_on_cpu_if_no_gpu() -> bool:
    """On a machine without CUDA, make every launched process a gloo rank; return True if it did.

    Without ``ACCELERATE_USE_CPU`` each process of ``accelerate launch --multi_gpu --num_processes N``
    (or torchrun) on a CPU machine trains alone as rank 0 of 1. DeepSpeed is left alone: Accelerate
    skips DeepSpeed entirely under that flag (``_process_group_kwargs`` names gloo for it instead).
    Entry scripts call this before anything creates Accelerate state.
    """
    if torch.cuda.is_available() or deepspeed_requested():
        return False
    os.environ["ACCELERATE_USE_CPU"] = "true"
    return True


class RunDirError(CassError, OSError):
    """The run directory (``run.output_dir``) cannot be created or written."""


class Run:
    """One training job: Accelerator, run dir, trackers, signal-triggered stops, checkpoints.

    ``config`` is the full (typed-dataclass) config saved to ``config.yaml``; ``cfg`` is its
    RunSection. Creating a Run seeds every RNG and installs the signal handlers. A fresh run then
    creates the directories, writes ``config.yaml`` and starts the trackers at once; a run with a
    checkpoint to resume writes nothing until ``resume()`` has checked and loaded it, so a refused or
    failed resume leaves the run dir as it was. Raises CheckpointError when ``output_dir`` already
    holds checkpoints and ``resume`` is empty (two runs never mix) or ``resume`` names no checkpoint,
    RunDirError when the run directory cannot be written.
    """

    def __init__(self, cfg: RunSection, *, config: Any = None, accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.config = config
        self.dir = Path(cfg.output_dir)
        self.checkpoints_dir = self.dir / "checkpoints"
        self.export_dir = self.dir / "export"
        self.metrics_path = self.dir / "metrics.jsonl"
        if not cfg.resume and find_latest(self.checkpoints_dir):  # never mix two runs' checkpoints and metrics
            raise CheckpointError(f"run.output_dir: {self.dir} already holds checkpoints (newest "
                                  f"{find_latest(self.checkpoints_dir).name}); pass --resume auto to continue "
                                  f"that run, or choose another --output-dir")
        self.resume_from = resolve_resume(cfg.resume, self.checkpoints_dir)
        self.precision, self.precision_reason = choose_precision(cfg.precision)
        self.accelerator = accelerator or Accelerator(
            mixed_precision={"fp32": "no"}.get(self.precision, self.precision),
            gradient_accumulation_steps=cfg.grad_accum_steps,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=str(self.dir),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=_process_group_kwargs(),
        )
        set_seed(cfg.seed)
        self.print(f"precision: {self.precision_reason}; {self.accelerator.num_processes} process(es) "
                   f"on {self.accelerator.device}")
        self._stop_signal: str | None = None
        self._old_handlers: dict[int, Any] = {}
        self._fingerprint: dict[str, Any] = {}
        self._tracker_floor = 0  # records at or below this step reached the trackers before: not sent again
        self._started = False
        self._install_signal_handlers()
        if self.resume_from is None:
            self._start(0)

    # ------------------------------------------------------------------ basics
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, message: str) -> None:
        """Log a message once (main process)."""
        if self.is_main:
            log.info(message)

    def _flat_config(self) -> dict[str, Any]:
        return flatten(to_dict(self.config)) if self.config is not None else {}

    def _start(self, step: int) -> None:
        """Create the run dir, write config.yaml, drop metrics after ``step``, start the trackers (all ranks)."""
        if self.is_main:
            try:
                for d in (self.dir, self.checkpoints_dir, self.export_dir):
                    d.mkdir(parents=True, exist_ok=True)
                if self.config is not None:
                    save_config(self.config, self.dir / "config.yaml")
                self._tracker_floor = truncate_metrics(self.metrics_path, step)
            except OSError as exc:
                raise RunDirError(f"run.output_dir: cannot write the run directory {self.dir} ({exc})") from exc
        self.accelerator.wait_for_everyone()
        self._start_trackers()
        self._started = True

    # ------------------------------------------------------------------ trackers and metrics
    def _start_trackers(self) -> None:
        floor = start_trackers(self.accelerator, report_to=self.cfg.report_to, project=self.cfg.project,
                               run_name=self.cfg.run_name, run_dir=self.dir,
                               config=to_dict(self.config) if self.config is not None else {})
        self._tracker_floor = max(self._tracker_floor, floor)
        if self._tracker_floor > 0:
            self.print(f"steps up to {self._tracker_floor} reached {self.cfg.report_to} before this start: "
                       f"they are not sent again")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record to metrics.jsonl and send it to the trackers (main process only).

        Records at or below a step the trackers already hold (logged before the checkpoint this run
        resumed from) go to metrics.jsonl only: W&B refuses steps below its last one.
        """
        if not self.is_main:
            return
        if not self._started:
            raise RuntimeError("Run.log before the run started: call run.resume() first")
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.cfg.report_to != "none" and step > self._tracker_floor:
            self.accelerator.log(metrics, step=step)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):  # only set a flag: the loop stops at a step boundary
            self._stop_signal = signal.Signals(signum).name

        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                try:
                    self._old_handlers[signum] = signal.signal(signum, request_stop)
                except ValueError:  # not the main thread (e.g. inside a test runner thread)
                    pass

    @property
    def stop_signal(self) -> str | None:
        """Name of the signal that asked this process to stop, if any."""
        return self._stop_signal

    @property
    def stop_requested(self) -> bool:
        """True once THIS process received SIGTERM/SIGUSR1 (local; ranks agree through ``should_stop``)."""
        return self._stop_signal is not None

    def should_stop(self, agreed: bool | None = None) -> bool:
        """Return True on every rank once any rank received SIGTERM/SIGUSR1. Call it on all ranks each step.

        ``agreed``: the all-rank answer the step's own collective already carried (``optimizer_step(...,
        stop_requested=run.stop_requested).stop``), so the hot loop pays no extra collective or host
        sync; without it this takes one all-reduce and one host sync.
        """
        if agreed is None:
            agreed = agree_any(self.stop_requested, self.accelerator.device)
        if agreed and not self._stop_signal:
            self._stop_signal = "peer"
        return agreed

    # ------------------------------------------------------------------ checkpoints
    def save(self, state: TrainState) -> Path:
        """Checkpoint the prepared objects and ``state`` (call on every rank); return the directory.

        The checkpoint records this run's fingerprint and flat config, so a later resume can check them.
        """
        state.fingerprint, state.config = dict(self._fingerprint), self._flat_config()
        path = save_checkpoint(self.accelerator, self.checkpoints_dir, state, keep_last=self.cfg.keep_last)
        self.print(f"checkpoint: {path}")
        return path

    def resume(self, fingerprint: dict[str, Any] | None = None) -> TrainState:
        """Restore the checkpoint named by ``run.resume`` (none: a fresh TrainState); return the TrainState.

        Call on every rank after ``accelerator.prepare``. ``fingerprint`` (``engine/fingerprint.py``)
        is what this run's checkpoints will record; a checkpoint whose fingerprint differs is refused
        before anything is loaded or written, unless ``run.resume_force`` names the differing fields.
        Config changes outside the fingerprint (schedule, logging) are logged. Only after a
        successful load does the run dir change (config.yaml, metrics.jsonl, trackers).
        Raises ResumeMismatchError (a ConfigError), CheckpointError (damaged or unloadable
        checkpoint), ConfigError (unknown ``run.resume_force`` field).
        """
        self._fingerprint = dict(fingerprint or {})
        path = self.resume_from
        if path is None:
            if self.cfg.resume == "auto":
                self.print("resume auto: no checkpoint yet, starting fresh")
            return TrainState()
        saved = read_train_state(path)
        force = parse_force(self.cfg.resume_force)
        notes = []
        if fingerprint is not None:
            notes = check_resume(saved.fingerprint, self._fingerprint, force=force, origin=str(path),
                                 batch_note=self._batch_note())
        state = load_checkpoint(self.accelerator, path, force_files=FORCE_FILES in force)
        self._start(state.global_step)
        self.print(f"resumed from {path} at step {state.global_step} (epoch {state.epoch}, "
                   f"batch {state.batch_in_epoch})")
        changes = config_changes(saved.config, self._flat_config(), skip=self._fingerprint) if saved.config else []
        for line in notes + [f"resume: {c} (changed since the checkpoint)" for c in changes]:
            self.print(line)
        return state

    def _batch_note(self) -> str:
        batch = getattr(getattr(self.config, "data", None), "batch_size", "?")
        return (f"data.batch_size x processes x run.grad_accum_steps, now {batch} x "
                f"{self.accelerator.num_processes} x {self.cfg.grad_accum_steps}")

    def finish(self) -> None:
        """End the trackers and restore the previous signal handlers."""
        self.accelerator.end_training()
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()

"""The Run: one training job's Accelerator, precision, run directory, trackers, signals and checkpoints.

Every loop (pretraining, fine-tuning) makes one Run and carries it; nothing here is global. A run
directory looks like::

    <output_dir>/config.yaml        the resolved config
    <output_dir>/metrics.jsonl      one JSON record per logging step (always written)
    <output_dir>/checkpoints/step-XXXXXXX/
    <output_dir>/export/            backbones for downstream use
    <output_dir>/wandb_id           the W&B run id, reused when the run resumes

Typical use::

    run = Run(cfg.run, config=cfg)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    state = run.resume()                        # TrainState(); restored when --resume finds a checkpoint
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
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from cass_dist.configs.base import RunSection, save_config, to_dict
from cass_dist.engine.checkpoint import (
    CheckpointError,
    TrainState,
    find_latest,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from cass_dist.utils.deepspeed import deepspeed_requested
from cass_dist.utils.distributed import agree_any

log = logging.getLogger("cass_dist")
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def choose_precision(requested: str = "auto") -> tuple[str, str]:
    """Return ``(precision, why)`` with precision one of "bf16", "fp16", "fp32".

    ``auto`` picks bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 with loss scaling
    on 7.x (T4, V100), and fp32 on older GPUs and on CPU. An explicit request is returned as is.
    Raises ValueError for an unknown request.
    """
    if requested in ("bf16", "fp16", "fp32"):
        return requested, f"{requested} as requested"
    if requested != "auto":
        raise ValueError(f"run.precision: must be auto, bf16, fp16 or fp32, got {requested!r}")
    if not torch.cuda.is_available():
        return "fp32", "fp32: no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        return "bf16", f"bf16: GPU compute capability {major}.{minor} supports it natively"
    if major == 7:
        return "fp16", (f"fp16 with dynamic loss scaling: GPU compute capability {major}.{minor} has no "
                        "native bf16 (T4/V100); non-finite steps are skipped by the scaler")
    return "fp32", f"fp32: GPU compute capability {major}.{minor} is too old for fast half precision"


def _wandb_offline_reason() -> str | None:
    """Why W&B must run offline (no credentials: wandb.init would prompt or wait), or None."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return None
    return "no W&B credentials (WANDB_API_KEY or ~/.netrc); logging offline, sync later with `wandb sync`"


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


class Run:
    """One training job: Accelerator, run dir, trackers, signal-triggered stops, checkpoints.

    ``config`` is the full (typed-dataclass) config saved to ``config.yaml``; ``cfg`` is its
    RunSection. Creating a Run seeds every RNG, creates the directories (main process) and starts
    the trackers. Raises CheckpointError when ``output_dir`` already holds checkpoints and ``resume``
    is empty (two runs never mix), OSError when the run directory cannot be created.
    """

    def __init__(self, cfg: RunSection, *, config: Any = None, accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.dir = Path(cfg.output_dir)
        self.checkpoints_dir = self.dir / "checkpoints"
        self.export_dir = self.dir / "export"
        self.metrics_path = self.dir / "metrics.jsonl"
        if not cfg.resume and find_latest(self.checkpoints_dir):  # never mix two runs' checkpoints and metrics
            raise CheckpointError(f"run.output_dir: {self.dir} already holds checkpoints (newest "
                                  f"{find_latest(self.checkpoints_dir).name}); pass --resume auto to continue "
                                  f"that run, or choose another --output-dir")
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
        if self.is_main:
            for d in (self.dir, self.checkpoints_dir, self.export_dir):
                d.mkdir(parents=True, exist_ok=True)
            if config is not None:
                save_config(config, self.dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        self.print(f"precision: {self.precision_reason}; {self.accelerator.num_processes} process(es) "
                   f"on {self.accelerator.device}")
        self._stop_signal: str | None = None
        self._old_handlers: dict[int, Any] = {}
        self._install_signal_handlers()
        self._start_trackers(config)

    # ------------------------------------------------------------------ basics
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, message: str) -> None:
        """Log a message once (main process)."""
        if self.is_main:
            log.info(message)

    # ------------------------------------------------------------------ trackers and metrics
    def _start_trackers(self, config: Any) -> None:
        if self.cfg.report_to == "none":
            return
        init_kwargs: dict[str, Any] = {}
        if self.cfg.report_to == "wandb":
            import wandb

            id_file = self.dir / "wandb_id"
            if self.is_main and not id_file.is_file():
                _write_text_atomic(id_file, uuid.uuid4().hex[:12])
            self.accelerator.wait_for_everyone()
            wandb_kwargs: dict[str, Any] = {
                "id": id_file.read_text().strip(), "resume": "allow", "dir": str(self.dir),
                "settings": wandb.Settings(init_timeout=60),
            }
            if self.cfg.run_name:
                wandb_kwargs["name"] = self.cfg.run_name
            offline = _wandb_offline_reason()
            if offline:
                self.print(offline)
                wandb_kwargs["mode"] = "offline"
            init_kwargs["wandb"] = wandb_kwargs
        flat = _flatten(to_dict(config)) if config is not None else {}
        try:
            self.accelerator.init_trackers(self.cfg.project, config=flat, init_kwargs=init_kwargs)
        except Exception as exc:  # a tracker must never kill or hang training: fall back to offline
            if self.cfg.report_to != "wandb":
                raise
            self.print(f"W&B could not start online ({exc}); logging offline instead")
            init_kwargs["wandb"]["mode"] = "offline"
            self.accelerator.init_trackers(self.cfg.project, config=flat, init_kwargs=init_kwargs)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record to metrics.jsonl and send it to the trackers (main process only)."""
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.cfg.report_to != "none":
            self.accelerator.log(metrics, step=step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (written by a run that died after its last checkpoint)."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        _write_text_atomic(self.metrics_path, "".join(ln + "\n" for ln in kept))

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
        """Checkpoint the prepared objects and ``state`` (call on every rank); return the directory."""
        path = save_checkpoint(self.accelerator, self.checkpoints_dir, state, keep_last=self.cfg.keep_last)
        self.print(f"checkpoint: {path}")
        return path

    def resume(self) -> TrainState:
        """Restore the checkpoint named by ``run.resume`` (none: a fresh TrainState); return the TrainState.

        Call after ``accelerator.prepare``. Raises CheckpointError for a bad ``--resume`` path.
        """
        path = resolve_resume(self.cfg.resume, self.checkpoints_dir)
        if path is None:
            if self.cfg.resume == "auto":
                self.print("resume auto: no checkpoint yet, starting fresh")
            self._truncate_metrics(0)  # records of an earlier attempt that never checkpointed
            return TrainState()
        state = load_checkpoint(self.accelerator, path)
        self._truncate_metrics(state.global_step)
        self.print(f"resumed from {path} at step {state.global_step} (epoch {state.epoch}, "
                   f"batch {state.batch_in_epoch})")
        return state

    def finish(self) -> None:
        """End the trackers and restore the previous signal handlers."""
        self.accelerator.end_training()
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

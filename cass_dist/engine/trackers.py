"""What a Run sends outside the loop: metrics.jsonl, W&B and TensorBoard, and how they survive a restart.

``metrics.jsonl`` holds every logging step once. A job killed after its last checkpoint has logged
steps that the resumed run logs again; ``truncate_metrics`` drops them from the file (and returns the
highest step the trackers were sent), so the Run sends only later steps: W&B refuses steps below its
last one. The W&B run id is ``WANDB_RUN_ID`` when set, else the one kept in ``<run dir>/wandb_id``.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("cass_dist")


def wandb_offline_reason() -> str | None:
    """Why W&B must run offline (no credentials: wandb.init would prompt or wait), or None."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return None
    return "no W&B credentials (WANDB_API_KEY or ~/.netrc); logging offline, sync later with `wandb sync`"


def wandb_run_id(run_dir: Path) -> str:
    """Return the W&B run id: ``WANDB_RUN_ID`` when set, else the run dir's ``wandb_id`` (made once).

    The id used is recorded in ``wandb_id``, so a later start without the variable continues that run.
    """
    id_file = run_dir / "wandb_id"
    stored = id_file.read_text().strip() if id_file.is_file() else ""
    from_env = os.environ.get("WANDB_RUN_ID", "").strip()
    if from_env and stored and from_env != stored:
        log.info(f"W&B: WANDB_RUN_ID={from_env} replaces the run dir's id {stored} ({id_file})")
    run_id = from_env or stored or uuid.uuid4().hex[:12]
    if run_id != stored:
        write_text_atomic(id_file, run_id)
    return run_id


def start_trackers(accelerator, *, report_to: str, project: str, run_name: str, run_dir: Path,
                   config: dict[str, Any]) -> int:
    """Start the configured trackers (call on every rank); return the last step W&B already holds (0: none).

    W&B gets the id of ``wandb_run_id``, ``WANDB_RESUME`` (default ``allow``) and offline mode when there
    are no credentials; if it cannot start online it falls back to offline rather than stop training.
    """
    if report_to == "none":
        return 0
    init_kwargs: dict[str, Any] = {}
    if report_to == "wandb" and accelerator.is_main_process:
        import wandb

        wandb_kwargs: dict[str, Any] = {
            "id": wandb_run_id(run_dir), "resume": os.environ.get("WANDB_RESUME") or "allow",
            "dir": str(run_dir), "settings": wandb.Settings(init_timeout=60),
        }
        if run_name:
            wandb_kwargs["name"] = run_name
        offline = wandb_offline_reason()
        if offline:
            log.info(offline)
            wandb_kwargs["mode"] = "offline"
        init_kwargs["wandb"] = wandb_kwargs
    flat = _flatten(config)
    try:
        accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)
    except Exception as exc:  # a tracker must never kill or hang training: fall back to offline
        if report_to != "wandb":
            raise
        log.info(f"W&B could not start online ({exc}); logging offline instead")
        init_kwargs["wandb"]["mode"] = "offline"
        accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)
    if report_to == "wandb" and accelerator.is_main_process:
        wandb_run = accelerator.get_tracker("wandb", unwrap=True)
        return max(0, int(getattr(wandb_run, "starting_step", 0) or 0) - 1)  # a resumed W&B run's next step
    return 0


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of ``path`` after ``step`` (written after the last checkpoint) and unreadable lines.

    Returns the highest step the file held: what the trackers were sent before this start (0: none).
    """
    if not path.is_file():
        return 0
    kept, last, unreadable = [], 0, 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, TypeError, KeyError):  # e.g. the half-written last line of a killed run
            unreadable += bool(line.strip())
            continue
        last = max(last, record_step)
        if record_step <= step:
            kept.append(line)
    if unreadable:
        log.warning(f"{path}: dropped {unreadable} unreadable line(s)")
    write_text_atomic(path, "".join(ln + "\n" for ln in kept))
    return last


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, fsync it, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

"""The "2 processes equal 1 process on the doubled batch" harness shared by the DDP equivalence tests.

A test file that uses it runs itself as the training script: ``ddp`` mode under ``accelerate launch``
on 2 gloo processes, ``merged`` mode as one process fed by :func:`merged_ranks_loader`, which
concatenates rank 0's and rank 1's batches so that the one process sees exactly the global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from tests.distributed._ranks import free_port

REPO = Path(__file__).resolve().parents[2]


class MergedRanks:
    """Rank 0's and rank 1's batches (world size 2) concatenated: one process sees the global batch."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return len(self.loaders[0])

    def __iter__(self):
        for parts in zip(*self.loaders):
            yield {"image": torch.cat([p["image"] for p in parts]), "label": torch.cat([p["label"] for p in parts]),
                   "key": [k for p in parts for k in p["key"]], "seed": parts[0]["seed"]}


def merged_ranks_loader(cfg, accelerator, epoch, start_batch):
    """``make_loader`` for the engine: both ranks' shares of ``cfg.data`` at half the batch, merged."""
    from cass_dist.data import build_loader

    d = cfg.data
    return MergedRanks([build_loader(d.shards, d.train_split, batch_size=d.batch_size // 2, train=True, rank=r,
                                     world_size=2, seed=cfg.run.seed, epoch=epoch, image_size=d.image_size,
                                     transform=d.transform, start_batch=start_batch) for r in range(2)])


def run_ddp_and_merged(script: str | os.PathLike, args: Callable[[Path, int], list[str]], work: Path,
                       per_process_batch: int) -> tuple[Path, Path]:
    """Train ``script`` as 2 DDP processes and as 1 merged process; return their run dirs ``(ddp, one)``.

    ``args(out, batch_size)`` gives the script's flags for a run dir and a per-process batch. Fails the
    calling test (with the stderr tail) when either run fails or the DDP run did not have 2 ranks.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    ddp_dir, one_dir = work / "ddp", work / "one"
    ddp = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), str(script), "ddp", *args(ddp_dir, per_process_batch)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert next(ddp_dir.glob("checkpoints/step-*/random_states_1.pkl"), None) is not None  # 2 ranks ran
    one = subprocess.run([sys.executable, str(script), "merged", *args(one_dir, 2 * per_process_batch)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    return ddp_dir, one_dir

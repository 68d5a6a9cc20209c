"""2-process DDP on CPU (gloo, through ``accelerate launch``) ends with the weights of 1 process on the doubled batch.

Run with the default objective (``vicreg``) and with ``paper``. For the comparison to be valid the two
runs must compute the same gradients:
- ``paper`` is a per-sample mean, so the mean over the doubled batch equals the average of the two
  ranks' means, which is what DDP's gradient all-reduce computes. ``vicreg`` adds variance and
  covariance terms, statistics of the batch: they are computed on the embeddings of both ranks,
  gathered with gradient (``objective.gather``, on by default), and the gather's backward (a sum
  over ranks) times DDP's average (1/2) gives exactly the gradient of the doubled batch;
- no BatchNorm (``test_convnext`` uses LayerNorm, ``test_vit`` LayerNorm, linear heads instead of the
  default BatchNorm projectors): per-rank batch statistics would differ between one batch of 2B and
  two of B, and torch 2.14's SyncBatchNorm still refuses CPU tensors ("expected input tensor to be on
  GPU", checked by tests/distributed/test_distributed_utils.py), so they cannot be synced on gloo;
- no random augmentation (``eval`` transform) and no dropout;
- the single process reads, at every step, exactly the union of what ranks 0 and 1 read: this file,
  run as a script with ``merged``, concatenates the two ranks' loaders (rank 0's rows first, the order
  of the gather).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # trains in subprocesses (still CPU, tiny models)
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
    from cass_dist.data import build_loader

    d = cfg.data
    return MergedRanks([build_loader(d.shards, d.train_split, batch_size=d.batch_size // 2, train=True, rank=r,
                                     world_size=2, seed=cfg.run.seed, epoch=epoch, image_size=d.image_size,
                                     transform=d.transform, start_batch=start_batch) for r in range(2)])


def args(shards, out, batch_size, objective):
    return ["--data", str(shards), "--output-dir", str(out), "--cnn", "test_convnext", "--vit", "test_vit",
            "--model.vit_patch_size", "8", "--embed-dim", "32", "--image-size", "32", "--batch-size", str(batch_size),
            "--precision", "fp32", "--model.channels_last", "false", "--objective", objective, "--head", "linear",
            "--data.transform", "eval", "--optim.eps", "1e-4", "--lr-cnn", "3e-3", "--lr-vit", "3e-3",
            "--max-steps", "4", "--warmup-steps", "1", "--log-every", "1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("objective", ["vicreg", "paper"])  # vicreg: the default, with batch statistics
def test_two_process_ddp_equals_one_process_on_the_doubled_batch(tmp_path, objective):
    from safetensors.torch import load_file

    from cass_dist.data.synthetic import build_synthetic

    shards = tmp_path / "syn"
    build_synthetic(shards, num_images=320, image_size=32, shard_size=80)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    ddp = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), __file__, "ddp", *args(shards, tmp_path / "ddp", 8, objective)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / "checkpoints" / "step-0000004" / "random_states_1.pkl").is_file()  # 2 ranks ran
    single = subprocess.run([sys.executable, __file__, "merged", *args(shards, tmp_path / "one", 16, objective)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    a = load_file(tmp_path / "ddp" / "checkpoints" / "step-0000004" / "model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("ddp", "one")]
    assert losses[0][-1] < losses[0][0]  # it trained
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


if __name__ == "__main__":
    from cass_dist.configs.pretrain import parse_pretrain_config
    from cass_dist.engine.pretrain import pretrain

    mode, argv = sys.argv[1], sys.argv[2:]
    if mode not in ("ddp", "merged"):
        pytest.exit(f"unknown mode {mode}")
    config = parse_pretrain_config(argv)
    pretrain(config) if mode == "ddp" else pretrain(config, make_loader=merged_ranks_loader)

"""2-process DINO (gloo, through ``accelerate launch``) ends where 1 process on the doubled batch ends.

What is distributed in DINO beyond DDP's gradient all-reduce: the centre is the mean teacher output
over ALL ranks (an all-reduce in the loss), the per-parameter clipping and the last-layer freeze act
on the reduced gradients, and the EMA teacher must stay the same on every rank. For the comparison
to be valid both runs compute the same thing: the ViT (LayerNorm, no BatchNorm), a per-sample mean
loss, no dropout, and a deterministic view transform in place of the random multi-crop (the crops of
one batch of 2B cannot be split into two batches of B); the single process reads, every step,
exactly the union of what ranks 0 and 1 read.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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
                   "key": [k for p in parts for k in p["key"]], "seed": parts[0]["seed"]}  # views ignore the seed


def merged_ranks_loader(cfg, accelerator, epoch, start_batch):
    from cass_dist.data import build_loader

    d = cfg.data
    return MergedRanks([build_loader(d.shards, d.train_split, batch_size=d.batch_size // 2, train=True, rank=r,
                                     world_size=2, seed=cfg.run.seed, epoch=epoch, image_size=d.image_size,
                                     transform="eval", start_batch=start_batch) for r in range(2)])


def deterministic_views(images, *, seed):
    x = (images.float() / 255 - 0.5) / 0.25
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return [x, x.flip(-1), F.avg_pool2d(x, 2), F.avg_pool2d(x.flip(-2), 2)]


def args(shards, out, batch_size):
    return ["--data", str(shards), "--output-dir", str(out), "--method", "dino", "--vit", "test_vit",
            "--model.vit_patch_size", "8", "--image-size", "32", "--batch-size", str(batch_size), "--precision", "fp32",
            "--dino.hidden_dim", "64", "--dino.bottleneck_dim", "32", "--dino.out_dim", "128",
            "--dino.momentum_teacher", "0.9", "--dino.freeze_last_layer", "0.25", "--dino.clip_grad", "0.05",
            "--dino.base_lr", "0", "--lr-vit", "1e-3", "--optim.eps", "1e-4", "--max-steps", "4", "--warmup-steps", "1",
            "--log-every", "1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_dino_equals_one_process_on_the_doubled_batch(tmp_path):
    from safetensors.torch import load_file

    from cass_dist.data.synthetic import build_synthetic

    shards = tmp_path / "syn"
    build_synthetic(shards, num_images=320, image_size=32, shard_size=80)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    ddp = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), __file__, "ddp", *args(shards, tmp_path / "ddp", 8)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / "checkpoints" / "step-0000004" / "random_states_1.pkl").is_file()  # 2 ranks ran
    single = subprocess.run([sys.executable, __file__, "merged", *args(shards, tmp_path / "one", 16)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    a = load_file(tmp_path / "ddp" / "checkpoints" / "step-0000004" / "model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert a.keys() == b.keys() and "loss.center" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    start = load_file(tmp_path / "one" / "start.safetensors")
    assert not torch.equal(a["teacher.blocks.0.attn.qkv.weight"], start["teacher.blocks.0.attn.qkv.weight"])


if __name__ == "__main__":
    from safetensors.torch import save_file

    from cass_dist.configs.pretrain import parse_pretrain_config
    from cass_dist.engine import pretrain as engine
    from cass_dist.methods.dino import DINOMethod

    mode, argv = sys.argv[1], sys.argv[2:]
    if mode not in ("ddp", "merged"):
        pytest.exit(f"unknown mode {mode}")
    DINOMethod.view_transform = lambda self, manifest: deterministic_views
    config = parse_pretrain_config(argv)
    build = engine.build_method

    def keep_start(cfg):
        method = build(cfg)
        Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in method.state_dict().items()}, f"{cfg.run.output_dir}/start.safetensors")
        return method

    engine.build_method = keep_start
    engine.pretrain(config) if mode == "ddp" else engine.pretrain(config, make_loader=merged_ranks_loader)

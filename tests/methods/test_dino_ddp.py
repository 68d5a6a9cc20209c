"""2-process DINO (gloo, through ``accelerate launch``) ends where 1 process on the doubled batch ends.

What is distributed in DINO beyond DDP's gradient all-reduce: the centre is the mean teacher output
over ALL ranks (an all-reduce in the loss), the per-parameter clipping and the last-layer freeze act
on the reduced gradients, and the EMA teacher must stay the same on every rank. For the comparison
to be valid both runs compute the same thing: the ViT (LayerNorm, no BatchNorm), a per-sample mean
loss, no dropout, and a deterministic view transform in place of the random multi-crop (the crops of
one batch of 2B cannot be split into two batches of B); the single process reads, every step,
exactly the union of what ranks 0 and 1 read.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed._merged import merged_ranks_loader, run_ddp_and_merged

pytestmark = pytest.mark.slow  # trains in subprocesses (still CPU, tiny models)


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


def test_two_process_dino_equals_one_process_on_the_doubled_batch(tmp_path):
    from safetensors.torch import load_file

    from cass_dist.data.synthetic import build_synthetic

    shards = tmp_path / "syn"
    build_synthetic(shards, num_images=320, image_size=32, shard_size=80)
    ddp_dir, one_dir = run_ddp_and_merged(__file__, lambda out, batch: args(shards, out, batch), tmp_path, 8)

    a = load_file(ddp_dir / "checkpoints" / "step-0000004" / "model.safetensors")
    b = load_file(one_dir / "checkpoints" / "step-0000004" / "model.safetensors")
    assert a.keys() == b.keys() and "loss.center" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    start = load_file(one_dir / "start.safetensors")
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

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
import sys

import pytest
import torch

from tests.distributed._merged import merged_ranks_loader, run_ddp_and_merged

pytestmark = pytest.mark.slow  # trains in subprocesses (still CPU, tiny models)


def args(shards, out, batch_size, objective):
    return ["--data", str(shards), "--output-dir", str(out), "--cnn", "test_convnext", "--vit", "test_vit",
            "--model.vit_patch_size", "8", "--embed-dim", "32", "--image-size", "32", "--batch-size", str(batch_size),
            "--precision", "fp32", "--model.channels_last", "false", "--objective", objective, "--head", "linear",
            "--data.transform", "eval", "--optim.eps", "1e-4", "--lr-cnn", "3e-3", "--lr-vit", "3e-3",
            "--max-steps", "4", "--warmup-steps", "1", "--log-every", "1"]


@pytest.mark.parametrize("objective", ["vicreg", "paper"])  # vicreg: the default, with batch statistics
def test_two_process_ddp_equals_one_process_on_the_doubled_batch(tmp_path, objective):
    from safetensors.torch import load_file

    from cass_dist.data.synthetic import build_synthetic

    shards = tmp_path / "syn"
    build_synthetic(shards, num_images=320, image_size=32, shard_size=80)
    ddp_dir, one_dir = run_ddp_and_merged(__file__, lambda out, batch: args(shards, out, batch, objective), tmp_path, 8)

    a = load_file(ddp_dir / "checkpoints" / "step-0000004" / "model.safetensors")
    b = load_file(one_dir / "checkpoints" / "step-0000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (ddp_dir, one_dir)]
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

"""One rank of the end-to-end guard test (``accelerate launch``, 2 gloo processes): pretraining or
fine-tuning with a NaN loss on rank 1 ONLY at one forward call; every rank writes its final weights.

    python _nan_run.py pretrain|finetune OUT_DIR BAD_CALL SHARDS     (OUT_DIR/<loop>/ is the run dir)

(One loop per launch: Accelerate's end_training destroys the process group, and re-creating it in
the same torchrun job can hang.)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def poison_on_rank_1(bad_call: int):
    """Return a forward hook that turns the ``loss`` of call ``bad_call`` into NaN on rank 1."""
    calls = []

    def hook(module, args, out):
        calls.append(1)
        if int(os.environ["RANK"]) == 1 and len(calls) == bad_call:
            return {**out, "loss": out["loss"] * float("nan")}
        return out

    return hook


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Parameters only: BatchNorm's running statistics are per process on CPU (DDP broadcasts rank 0's
    before each forward, and each rank's own last batch updates them after)."""
    save_file({k: v.detach().contiguous() for k, v in module.named_parameters()}, str(path))


def main(loop: str, out: Path, bad_call: int, shards: str) -> None:
    from cass_dist.configs.finetune import parse_finetune_config
    from cass_dist.configs.pretrain import parse_pretrain_config
    from cass_dist.engine import finetune as finetune_module
    from cass_dist.engine import pretrain as pretrain_module

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the entry scripts do: run.print's lines
    rank, built = int(os.environ["RANK"]), {}
    out.mkdir(parents=True, exist_ok=True)
    if loop == "pretrain":
        real_method = pretrain_module.build_method

        def build_method(cfg):
            built["model"] = model = real_method(cfg)
            model.register_forward_hook(poison_on_rank_1(bad_call))
            return model

        pretrain_module.build_method = build_method
        # the defaults (vicreg, BatchNorm projector heads, sync_bn auto) on tiny models
        pretrain_module.pretrain(parse_pretrain_config([
            "--data", shards, "--output-dir", str(out / loop), "--cnn", "test_resnet", "--vit", "test_vit",
            "--model.vit_patch_size", "8", "--embed-dim", "32", "--model.proj_hidden_dim", "64", "--image-size",
            "32", "--batch-size", "8", "--precision", "fp32", "--max-steps", "5", "--log-every", "1"]))
    else:
        real_classifier, real_loss, loss_calls = finetune_module.build_classifier, finetune_module.FinetuneLoss, []

        def build_classifier(*args):
            built["model"] = model = real_classifier(*args)
            return model

        class FinetuneLoss(real_loss):
            def __call__(self, *args):
                loss_calls.append(1)
                loss = super().__call__(*args)
                return loss * float("nan") if rank == 1 and len(loss_calls) == bad_call else loss

        finetune_module.build_classifier, finetune_module.FinetuneLoss = build_classifier, FinetuneLoss
        finetune_module.finetune(parse_finetune_config([
            "--data", shards, "--output-dir", str(out / loop), "--init", "random", "--branch", "cnn",
            "--batch-size", "8", "--image-size", "32", "--precision", "fp32", "--max-steps", "5", "--log-every", "1"]))
    save_weights(built["model"], out / f"{loop}-rank{rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

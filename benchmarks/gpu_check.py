"""The checks that need a GPU, in one go (about 5 minutes on one H100-class GPU); prints each result.

    python benchmarks/gpu_check.py [--quick] [--out report.json]

1. SyncBatchNorm: ``model.sync_bn`` auto converts every BatchNorm of the pretrainer (CNN, projector
   heads, SimSiam predictors) for several CUDA processes, and the converted model trains on CUDA (one
   process: a world-size-1 NCCL group, where torch falls back to plain BatchNorm; the cross-rank
   statistics themselves need 2 GPUs).
2. Every objective under CUDA bf16 autocast returns an fp32 loss equal to its fp32 computation.
3. channels_last: the CNN's conv weights are channels_last and a bf16 step through the engine's
   ``optimizer_step`` is finite; a resnet50 step timed with and without it.
4. Host syncs: ``torch.cuda.set_sync_debug_mode("warn")`` over engine steps, at most one per step
   (the non-finite guard's agreement), and a NaN step is skipped.
5. ``benchmarks/pretrain_step.py --suite gpu`` (resnet50 + vit_base_patch16_224, batch 64, bf16, MFU),
   fed by synthetic device tensors and by the real loader on synthetic 224 px shards (data wait).

Exits 2 with a one-line reason when CUDA is not available, 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiny_pretrainer(objective: str = "simsiam", channels_last: bool = False):
    from cass_dist.configs.pretrain import parse_pretrain_config
    from cass_dist.methods import build_method

    cfg = parse_pretrain_config(["--data", "unused", "--cnn", "resnet18", "--vit", "vit_tiny_patch16_224",
                                 "--image-size", "64", "--model.vit_patch_size", "8", "--embed-dim", "128",
                                 "--model.proj_hidden_dim", "256", "--objective", objective,
                                 "--model.channels_last", str(channels_last).lower()])
    return build_method(cfg), cfg


def check_sync_bn() -> dict:
    import torch.distributed as dist

    from cass_dist.utils.distributed import batchnorm_modules, sync_batchnorm

    model, _ = tiny_pretrainer("simsiam")
    layers = batchnorm_modules(model)
    model, why = sync_batchnorm(model, "auto", num_processes=2, device=torch.device("cuda"))
    synced = [n for n, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert synced == layers and {n.split(".")[1] for n in synced} >= {"cnn", "cnn_head", "vit_head",
                                                                       "predictor_cnn", "predictor_vit"}, synced
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    model = model.cuda().train()
    images = torch.randn(16, 3, 64, 64, device="cuda")
    out = model(images)
    out["loss"].backward()
    dist.destroy_process_group()  # the engine checks below make their own (single-process) Accelerator
    assert torch.isfinite(out["loss"]), out["loss"]
    return {"batchnorm_layers": len(layers), "synced": len(synced), "why": why, "loss": float(out["loss"].detach())}


def check_fp32_objectives() -> dict:
    from cass_dist.losses import OBJECTIVES, build_objective

    torch.manual_seed(0)
    head = torch.nn.Linear(256, 512).cuda()
    x = torch.randn(64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z_cnn, z_vit = head(x), head(x.flip(0) + 0.1)
    assert z_cnn.dtype == torch.bfloat16
    results = {}
    for name in sorted(OBJECTIVES):
        objective = build_objective(name, embed_dim=512).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            inside = objective(z_cnn, z_vit)
        outside = objective(z_cnn.float(), z_vit.float())
        for key, value in inside.items():
            assert value.dtype == torch.float32, (name, key, value.dtype)
            torch.testing.assert_close(value, outside[key], rtol=1e-6, atol=1e-6, msg=f"{name}.{key}")
        results[name] = float(inside["loss"].detach())
    return results


def engine_step(objective: str = "vicreg", channels_last: bool = True, precision: str = "bf16"):
    """(step closure taking images and a poison flag, model): the engine's optimizer_step on CUDA."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from cass_dist.engine.pretrain import build_optimizer
    from cass_dist.engine.step import optimizer_step

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    model, cfg = tiny_pretrainer(objective, channels_last)
    acc = Accelerator(mixed_precision=precision)
    optimizer = build_optimizer(cfg.optim, model)
    model, optimizer = acc.prepare(model, optimizer)

    def forward(batch):
        images = batch["image"]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out = model(images)
        return {**out, "loss": out["loss"] * float("nan")} if batch.get("nan") else out

    def step(images, nan=False):
        return optimizer_step(acc, model, optimizer, [{"image": images, "nan": nan}], forward, clip_grad=1.0)
    return step, acc.unwrap_model(model)


def check_channels_last() -> dict:
    step, model = engine_step(channels_last=True)
    convs = [m for m in model.model.cnn.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    outcome = step(torch.randn(32, 3, 64, 64, device="cuda"))
    assert outcome.finite and torch.isfinite(outcome.loss_sum)
    return {"channels_last_convs": len(convs), "loss": float(outcome.loss_sum), **time_resnet50()}


def time_resnet50(batch: int = 64, steps: int = 10) -> dict:
    import timm

    out = {}
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = timm.create_model("resnet50").cuda().to(memory_format=memory_format)
        optimizer = torch.optim.AdamW(model.parameters())
        images = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=memory_format)
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(images).float().logsumexp(1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        name = "channels_last" if memory_format is torch.channels_last else "contiguous"
        out[f"resnet50_bf16_images_per_sec_{name}"] = steps * batch / (time.perf_counter() - start)
    return out


def check_host_syncs(steps: int = 6) -> dict:
    step, _ = engine_step()
    images = torch.randn(32, 3, 64, 64, device="cuda")
    step(images)  # warm-up: lazy initialisation may sync
    per_step = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for i in range(steps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome = step(images, nan=i == 2)
            per_step.append(sum("synchroniz" in str(w.message) for w in caught))
            assert outcome.finite == (i != 2), (i, outcome.finite)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert max(per_step) <= 1, per_step
    return {"syncs_per_step": per_step}


def run_pretrain_step_suite(with_data: bool, quick: bool) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks/pretrain_step.py"), "--suite", "gpu"]
    if quick:
        cmd += ["--steps", "5", "--warmup", "2"]
    if with_data:
        from cass_dist.data.synthetic import build_synthetic

        shards = Path(tempfile.mkdtemp()) / "syn224"
        build_synthetic(shards, num_images=1024 if quick else 4096, image_size=224)
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
        cmd += ["--data", str(shards), "--num-workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"output": done.stdout.strip().splitlines()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer timed steps and a smaller shard set")
    p.add_argument("--no-data", action="store_true", help="skip the loader part of the pretrain_step suite")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False); run it on a machine "
              "with an NVIDIA GPU", file=sys.stderr)
        return 2
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    checks = {"sync_bn": check_sync_bn, "fp32_objectives": check_fp32_objectives,
              "channels_last": check_channels_last, "host_syncs": check_host_syncs,
              "pretrain_step_gpu": lambda: run_pretrain_step_suite(not args.no_data, args.quick)}
    results, failed = {}, []
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, **check()}
        except Exception as exc:  # report every check, then fail
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {json.dumps(results[name], indent=1)}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print("gpu_check: " + (f"FAILED {failed}" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

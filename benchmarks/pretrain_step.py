"""Our CASS training step vs a faithful copy of the original loop: images/s and peak memory, one invocation.

The original (Singh & Cirrone's CASS code): two timm models, two Adam optimizers (lr 1e-3), two
CosineAnnealingLR(T_max=16) stepped per batch, fp32, no gradient checkpointing, the 2 - 2cos loss on
the raw outputs. Its missing ``zero_grad`` is added so the baseline is fair (and correct).
Ours: ``CASSPretrainer`` + AdamW with per-branch groups through Accelerate and the engine's own
``optimizer_step`` (non-finite guard included), precision from ``choose_precision`` (bf16 on >= 8.0
GPUs, fp16 on 7.x, fp32 on CPU), channels_last CNN, optional gradient checkpointing and torch.compile.
Both use the same models, images and batch; the objective of ours defaults to ``paper`` so that only
the engineering differs.

``--processes N`` runs ours as N DDP processes (gloo on CPU; torch.distributed.run), so the objective's
all-gather and the guard's collective are in the step; images/s is then the total over processes (the
original stays one process). ``--data DIR`` also feeds ours from the real loader (``build_loader`` on
DIR's train split, ``--num-workers``) and prints the fraction of the step spent waiting for the next
batch, next to synthetic tensors already on the device.

Each variant runs in its own child process (clean peak memory: CUDA allocator peak on GPU, max RSS
on CPU). Usage::

    python benchmarks/pretrain_step.py                                  # CPU, small models
    python benchmarks/pretrain_step.py --processes 2 --objective vicreg # 2 gloo processes, global statistics
    python benchmarks/pretrain_step.py --data shards/demo --image-size 32 --num-workers 1   # data wait
    python benchmarks/pretrain_step.py --suite gpu [--data DIR]         # resnet50 + vit_base_patch16_224, batch 64, MFU
    python benchmarks/pretrain_step.py --suite fit --memory-gib 15      # largest paper batch in 15 GiB, +/- checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 peak (TFLOPS) by device-name fragment, for MFU; --peak-tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "T4": 65.0, "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["step", "gpu", "fit"], default="step")
    p.add_argument("--cnn", default="resnet18")
    p.add_argument("--vit", default="vit_tiny_patch16_224")
    p.add_argument("--vit-patch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=1000)
    p.add_argument("--objective", default="paper")
    p.add_argument("--precision", default="auto")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--memory-gib", type=float, default=15.0, help="fit suite: memory cap per process")
    p.add_argument("--preset", default="t4", help="fit suite: the preset whose models, size and precision to fit")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--processes", type=int, default=1, help="ours as N DDP processes (total images/s)")
    p.add_argument("--data", default="", help="a shard dir: also time ours fed by build_loader (data wait)")
    p.add_argument("--num-workers", type=int, default=0, help="loader workers per process with --data")
    p.add_argument("--variant", choices=["original", "ours", "fit"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def synthetic_batch(batch_size: int, image_size: int, device) -> torch.Tensor:
    return torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)


def vit_kwargs(args) -> dict:
    return {"img_size": args.image_size, **({"patch_size": args.vit_patch_size} if args.vit_patch_size else {})}


# ----------------------------------------------------------------------------- the two steps
def original_step(args, device):
    """The original loop, made fair: returns a closure doing one training step on a batch."""
    import timm

    cnn = timm.create_model(args.cnn, num_classes=args.embed_dim).to(device)
    vit = timm.create_model(args.vit, num_classes=args.embed_dim, **vit_kwargs(args)).to(device)
    opt_cnn = torch.optim.Adam(cnn.parameters(), lr=1e-3)
    opt_vit = torch.optim.Adam(vit.parameters(), lr=1e-3)
    sched_cnn = torch.optim.lr_scheduler.CosineAnnealingLR(opt_cnn, T_max=16)
    sched_vit = torch.optim.lr_scheduler.CosineAnnealingLR(opt_vit, T_max=16)

    def step(images):
        opt_cnn.zero_grad()  # added: the original accumulates gradients forever
        opt_vit.zero_grad()
        loss = (2 - 2 * F.cosine_similarity(cnn(images), vit(images), dim=-1)).mean()
        loss.backward()
        opt_cnn.step()
        opt_vit.step()
        sched_cnn.step()
        sched_vit.step()
        return loss
    return step, (cnn, vit)


def our_step(args, device, *, grad_checkpointing: bool | None = None, preset: str | None = None):
    """Our engine's step (build_method, build_optimizer, Accelerate precision, the engine's
    optimizer_step); returns (closure, (model, cfg, precision, accelerator))."""
    from accelerate import Accelerator

    from cass_dist.configs.pretrain import parse_pretrain_config
    from cass_dist.engine.pretrain import build_optimizer
    from cass_dist.engine.run import choose_precision
    from cass_dist.engine.step import optimizer_step
    from cass_dist.methods import build_method

    if preset:
        cfg = parse_pretrain_config(["--preset", preset, "--data", "unused", "--pretrained", "false"])
    else:
        cfg = parse_pretrain_config([
            "--data", "unused", "--cnn", args.cnn, "--vit", args.vit, "--image-size", str(args.image_size),
            "--embed-dim", str(args.embed_dim), "--objective", args.objective, "--precision", args.precision,
            "--model.vit_patch_size", str(args.vit_patch_size or "null"), "--compile", str(args.compile).lower(),
            "--model.channels_last", str(device.type == "cuda").lower()])
    if grad_checkpointing is not None:
        cfg.model.grad_checkpointing = grad_checkpointing
    precision, _ = choose_precision(cfg.run.precision)
    acc = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=device.type == "cpu")
    model = build_method(cfg)
    if acc.num_processes > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what model.sync_bn auto does
    optimizer = build_optimizer(cfg.optim, model)
    model, optimizer = acc.prepare(model, optimizer)
    channels_last = cfg.model.channels_last

    def forward(images):
        # [B, 2, C, H, W] (two views from the loader): the CNN gets the first, the ViT the second
        cnn_images, vit_images = images.unbind(1) if images.ndim == 5 else (images, None)
        if channels_last:
            cnn_images = cnn_images.contiguous(memory_format=torch.channels_last)
        return model(cnn_images, vit_images)

    def step(images):
        # [1]: the window's loss sum, in both the (finite, loss_sum, out) tuple of earlier versions and StepOutcome
        return optimizer_step(acc, model, optimizer, [images], forward)[1]
    return step, (model, cfg, precision, acc)


# ----------------------------------------------------------------------------- child: measure one variant
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, next_images, args, device) -> dict:
    """Time ``args.steps`` steps after ``args.warmup``; ``next_images()`` gives each step's batch.

    ``data_wait_frac``: the share of the time spent in ``next_images`` (0 for tensors already there).
    """
    for _ in range(args.warmup):
        step(next_images())
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    waited, images_seen = 0.0, 0
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        images = next_images()
        waited += time.perf_counter() - t0
        loss = step(images)
        images_seen += len(images)
    sync(device)
    seconds = time.perf_counter() - start
    out = {"images_per_sec": images_seen / seconds, "step_ms": 1000 * seconds / args.steps,
           "loss": float(loss.detach()), "data_wait_frac": waited / seconds}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def loader_batches(args, acc, device):
    """Return a callable giving the next training batch of ``args.data`` on ``device`` (cycling epochs).

    Only the public ``build_loader`` is used. uint8 batches are scaled to [0, 1] on the device (a stand-in
    for device-side normalisation) and 1-channel images expanded to 3.
    """
    from cass_dist.data import build_loader

    def epochs():
        for epoch in range(10**6):
            yield from build_loader(args.data, "train", batch_size=args.batch_size, train=True,
                                    rank=acc.process_index, world_size=acc.num_processes,
                                    num_workers=args.num_workers, seed=0, epoch=epoch, image_size=args.image_size)

    batches = epochs()

    def next_images():
        images = next(batches)["image"].to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if images.shape[-3] == 1:
            images = images.expand(*images.shape[:-3], 3, *images.shape[-2:])
        return images
    return next_images


def step_flops(step, images) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(images)
    return float(counter.get_total_flops())


def largest_batch(args, device, grad_checkpointing: bool) -> int:
    """Largest batch of the preset that trains two steps within --memory-gib (doubling, then bisection)."""
    step, (model, cfg, _, _) = our_step(args, device, grad_checkpointing=grad_checkpointing, preset=args.preset)
    size = cfg.data.image_size

    def fits(batch):
        try:
            images = synthetic_batch(batch, size, device)
            step(images)
            step(images)
            sync(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    good, bad = 0, None
    batch = 8
    while bad is None and batch <= 4096:
        good, bad, batch = (batch, None, batch * 2) if fits(batch) else (good, batch, batch)
    bad = bad or batch
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def child(args) -> dict | None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.variant == "fit":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
        return {"largest_batch": largest_batch(args, device, args.grad_checkpointing)}
    images = synthetic_batch(args.batch_size, args.image_size, device)
    if args.variant == "original":
        step, _ = original_step(args, device)
        result = measure(step, lambda: images, args, device)
    else:
        step, (_, _, precision, acc) = our_step(args, device, grad_checkpointing=args.grad_checkpointing)
        result = {**measure(step, lambda: images, args, device), "precision": precision,
                  "processes": acc.num_processes}
        if args.data:
            result["loader"] = measure(step, loader_batches(args, acc, device), args, device)
        if acc.num_processes > 1:  # every rank steps in lockstep: the total is processes x this rank's
            for res in (result, result.get("loader", {})):
                if res:
                    res["images_per_sec"] *= acc.num_processes
        if not acc.is_main_process:
            return None
    if device.type == "cuda" and args.suite == "gpu":
        result["flops_per_step"] = step_flops(step, images)
    return result


# ----------------------------------------------------------------------------- parent: run children, compare
def run_child(argv: list[str], variant: str, processes: int = 1, **flags) -> dict:
    extra = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is True]
    launcher = [sys.executable]
    if processes > 1:  # DDP ranks; on a machine without CUDA each is a gloo CPU rank
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                     str(_free_port())]
    cmd = [*launcher, __file__, *argv, "--variant", variant, *extra]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if processes > 1 and not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own peak RSS (its output is one short line)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read()
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} benchmark failed (exit {proc.returncode})")
    result = next(json.loads(line) for line in reversed(stdout.strip().splitlines()) if line.startswith("{"))
    return {**result, "max_rss_gib": usage.ru_maxrss / 2**20}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.variant:
        result = child(args)
        if result is not None:  # one line, from the main process only
            print(json.dumps(result))
        return 0
    if args.suite == "gpu":
        argv += ["--cnn", "resnet50", "--vit", "vit_base_patch16_224", "--image-size", "224",
                 "--batch-size", "64", "--vit-patch-size", "0", "--precision", "auto"]
        args = parse_args(argv)
    if args.suite == "fit":
        for ckpt in (False, True):
            res = run_child(argv, "fit", grad_checkpointing=ckpt)
            print(f"preset {args.preset}, checkpointing {'on ' if ckpt else 'off'}: largest batch within "
                  f"{args.memory_gib:g} GiB = {res['largest_batch']}")
        return 0
    print(f"{args.cnn} + {args.vit} at {args.image_size} px, batch {args.batch_size} per process, objective "
          f"{args.objective} (ours), {args.steps} timed steps after {args.warmup} warmup")
    original = run_child(argv, "original")
    ours = run_child(argv, "ours", args.processes, grad_checkpointing=args.grad_checkpointing, compile=args.compile)
    rows = [("original (fp32, 2x Adam)", original), (f"ours ({ours['precision']}, {args.processes} proc)", ours)]
    if "loader" in ours:
        rows.append((f"ours + loader ({args.num_workers} workers)", {**ours, **ours["loader"]}))
    for name, res in rows:
        mem = res.get("peak_mem_gib", res.get("max_rss_gib", float("nan")))
        kind = "GPU peak" if "peak_mem_gib" in res else "max RSS"
        print(f"  {name:30s} {res['images_per_sec']:9.1f} images/s  {res['step_ms']:8.1f} ms/step  "
              f"{kind} {mem:6.2f} GiB  data wait {100 * res['data_wait_frac']:4.1f}%")
    print(f"  speed-up: {ours['images_per_sec'] / original['images_per_sec']:.2f}x"
          + (f" (ours: {args.processes} processes in total, the original: 1)" if args.processes > 1 else ""))
    if "flops_per_step" in ours:
        name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), 0.0)
        achieved = ours["flops_per_step"] * ours["images_per_sec"] / args.batch_size / 1e12
        mfu = f"{100 * achieved / peak:.1f}% of {peak:g}" if peak else "unknown peak (pass --peak-tflops)"
        print(f"  ours: {achieved:.1f} TFLOPS achieved on {name}, MFU {mfu} TFLOPS bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())

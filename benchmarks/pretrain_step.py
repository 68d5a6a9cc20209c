"""Our CASS training step vs a faithful copy of the original loop: images/s and peak memory, one invocation.

The original (Singh & Cirrone's CASS code): two timm models, two Adam optimizers (lr 1e-3), two
CosineAnnealingLR(T_max=16) stepped per batch, fp32, no gradient checkpointing, the 2 - 2cos loss on
the raw outputs. Its missing ``zero_grad`` is added so the baseline is fair (and correct).
Ours: ``CASSPretrainer`` + AdamW with per-branch groups through Accelerate, precision from
``choose_precision`` (bf16 on >= 8.0 GPUs, fp16 on 7.x, fp32 on CPU), channels_last CNN, optional
gradient checkpointing and torch.compile. Both use the same models, images and batch; the objective
of ours defaults to ``paper`` so that only the engineering differs.

Each variant runs in its own child process (clean peak memory: CUDA allocator peak on GPU, max RSS
on CPU). Usage::

    python benchmarks/pretrain_step.py                                  # CPU, small models
    python benchmarks/pretrain_step.py --suite gpu                      # resnet50 + vit_base_patch16_224, batch 64, MFU
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
    """Our engine's step (build_pretrainer, build_optimizer, Accelerate precision); returns (closure, model)."""
    from accelerate import Accelerator

    from cass_dist.configs.pretrain import parse_pretrain_config
    from cass_dist.engine.pretrain import build_optimizer, build_pretrainer
    from cass_dist.engine.run import choose_precision

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
    model = build_pretrainer(cfg)
    optimizer = build_optimizer(cfg.optim, model)
    model, optimizer = acc.prepare(model, optimizer)
    channels_last = cfg.model.channels_last

    def step(images):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = model(images)["loss"]
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step, (model, cfg, precision)


# ----------------------------------------------------------------------------- child: measure one variant
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, images, args, device) -> dict:
    for _ in range(args.warmup):
        step(images)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(images)
    sync(device)
    seconds = time.perf_counter() - start
    out = {"images_per_sec": args.steps * len(images) / seconds, "step_ms": 1000 * seconds / args.steps,
           "loss": float(loss.detach())}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def step_flops(step, images) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(images)
    return float(counter.get_total_flops())


def largest_batch(args, device, grad_checkpointing: bool) -> int:
    """Largest batch of the preset that trains two steps within --memory-gib (doubling, then bisection)."""
    step, (model, cfg, _) = our_step(args, device, grad_checkpointing=grad_checkpointing, preset=args.preset)
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


def child(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.variant == "fit":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
        return {"largest_batch": largest_batch(args, device, args.grad_checkpointing)}
    images = synthetic_batch(args.batch_size, args.image_size, device)
    if args.variant == "original":
        step, _ = original_step(args, device)
        result = measure(step, images, args, device)
    else:
        step, (_, _, precision) = our_step(args, device, grad_checkpointing=args.grad_checkpointing)
        result = {**measure(step, images, args, device), "precision": precision}
    if device.type == "cuda" and args.suite == "gpu":
        result["flops_per_step"] = step_flops(step, images)
    return result


# ----------------------------------------------------------------------------- parent: run children, compare
def run_child(argv: list[str], variant: str, **flags) -> dict:
    extra = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is True]
    cmd = [sys.executable, __file__, *argv, "--variant", variant, *extra]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own peak RSS (its output is one short line)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read()
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} benchmark failed (exit {proc.returncode})")
    return {**json.loads(stdout.strip().splitlines()[-1]), "max_rss_gib": usage.ru_maxrss / 2**20}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
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
    print(f"{args.cnn} + {args.vit} at {args.image_size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warmup")
    original = run_child(argv, "original")
    ours = run_child(argv, "ours", grad_checkpointing=args.grad_checkpointing, compile=args.compile)
    for name, res in (("original (fp32, 2x Adam)", original), (f"ours ({ours['precision']})", ours)):
        mem = res.get("peak_mem_gib", res.get("max_rss_gib", float("nan")))
        kind = "GPU peak" if "peak_mem_gib" in res else "max RSS"
        print(f"  {name:26s} {res['images_per_sec']:9.1f} images/s  {res['step_ms']:8.1f} ms/step  "
              f"{kind} {mem:6.2f} GiB")
    print(f"  speed-up: {ours['images_per_sec'] / original['images_per_sec']:.2f}x")
    if "flops_per_step" in ours:
        name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), 0.0)
        achieved = ours["flops_per_step"] * ours["images_per_sec"] / args.batch_size / 1e12
        mfu = f"{100 * achieved / peak:.1f}% of {peak:g}" if peak else "unknown peak (pass --peak-tflops)"
        print(f"  ours: {achieved:.1f} TFLOPS achieved on {name}, MFU {mfu} TFLOPS bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The data layer's checks that need a GPU, in one short script (about a minute on one GPU).

    python benchmarks/data_gpu_check.py [--data ../shared/data/brain_tumor_mri] [--batch-size 256]

1. ``decode: gpu``: nvJPEG (``EncodedImages.to("cuda")``) against libjpeg on the CPU (the same call on
   a CPU device), image by image: the largest and the mean absolute difference in grey levels.
2. Every device transform on CUDA against the same transform on CPU tensors, same seed: the views
   must agree to float tolerance (the parameters are drawn on the CPU either way).
3. No host sync inside a device transform: run under ``torch.cuda.set_sync_debug_mode("error")``.
4. Speed: the device transform (pretrain, two views) in ms per image on the GPU, and the stream with
   ``decode: gpu`` vs ``cpu`` in images/s and images per host CPU-second.

Prints one line per check and exits 1 when a check fails. Also run the pytest cases that skip
without CUDA: ``python -m pytest -q tests/data -k "cuda or nvjpeg"``.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from cass_dist.data import build_loader
from cass_dist.data.augment import KINDS, manifest_transform
from cass_dist.data.images import ImageOptions
from cass_dist.data.sources import read_folder
from cass_dist.data.synthetic import synthetic_source
from cass_dist.data.writer import WriteOptions, write_shards

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_tumor_mri"


def report(name: str, ok: bool, detail: str, failures: list[str]) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def stream(shards: Path, decode: str, args, limit: int) -> tuple[float, float]:
    loader = build_loader(shards, "train", batch_size=args.batch_size, train=True, num_workers=args.workers,
                          image_size=224, device="cuda", decode=decode)
    transform = loader.device_transform("pretrain", views=2)
    wall, cpu, images = time.perf_counter(), host_cpu(), 0
    for batch in loader:
        transform(batch["image"].to("cuda", non_blocking=True), seed=batch["seed"])
        images += len(batch["key"])
        if images >= limit:
            break
    torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    loader.close()
    del loader, batch
    gc.collect()  # joins the workers, so their CPU time is counted
    return images / wall, images / max(host_cpu() - cpu, 1e-9)


def host_cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 2
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cass-gpu-check-") as tmp:
        shards = Path(tmp) / "jpg"
        source = read_folder(args.data) if (args.data / "Training").is_dir() else synthetic_source(num_images=2000,
                                                                                                  image_size=256)
        write_shards(source, shards, WriteOptions(image=ImageOptions(format="jpg", quality=95), progress=False))
        print(f"shards: {shards} from {args.data if (args.data / 'Training').is_dir() else 'the synthetic set'}")

        # 1. nvJPEG against libjpeg, same resize code
        worst, total, count = 0.0, 0.0, 0
        for batch in build_loader(shards, "test", batch_size=64, train=False, image_size=224, decode="gpu"):
            diff = (batch["image"].to("cuda").cpu().float() - batch["image"].to("cpu").float()).abs()
            worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
        report("nvJPEG == CPU decode", worst <= 6 and total / count < 0.5,
               f"max |diff| {worst:.0f}, mean {total / count:.3f} grey levels over {count // (3 * 224 * 224)} images",
               failures)

        # 2. and 3. device transforms: CUDA == CPU, and no host sync
        loader = build_loader(shards, "train", batch_size=64, train=True, image_size=224)
        batch = next(iter(loader))
        for kind in KINDS:
            transform = manifest_transform(kind, loader.manifest, image_size=224, views=2)
            on_cpu = transform(batch["image"], seed=batch["seed"])
            images = batch["image"].cuda()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                on_gpu = transform(images, seed=batch["seed"])
                synced = ""
            except RuntimeError as exc:
                on_gpu, synced = None, str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            report(f"{kind}: no host sync", not synced, synced or "none under set_sync_debug_mode('error')", failures)
            if on_gpu is None:
                on_gpu = transform(images, seed=batch["seed"])
            gap = max(float((g.cpu() - c).abs().max()) for g, c in zip(on_gpu, on_cpu))
            report(f"{kind}: CUDA == CPU", gap < 2e-3, f"max |diff| {gap:.2e} (normalised units)", failures)

        # 4. speed
        transform = manifest_transform("pretrain", loader.manifest, image_size=224, views=2)
        images = torch.cat([batch["image"]] * (args.batch_size // 64 or 1)).cuda()
        transform(images, seed=0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for seed in range(5):
            transform(images, seed=seed)
        torch.cuda.synchronize()
        print(f"INFO device transform (pretrain, 2 views, batch {len(images)}): "
              f"{1000 * (time.perf_counter() - start) / (5 * len(images)):.3f} ms per image")
        for decode in ("cpu", "gpu"):
            rate, per_cpu = stream(shards, decode, args, limit=20 * args.batch_size)
            print(f"INFO stream + device transform, decode {decode}: {rate:.0f} images/s, "
                  f"{per_cpu:.0f} images per host CPU-second ({args.workers} workers, main process included)")
    print("all checks passed" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

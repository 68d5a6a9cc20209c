"""Host CPU cost of feeding pretraining: our shard stream vs torchvision ImageFolder with the CASS transforms.

    python benchmarks/data_throughput.py [--data DIR] [--workers 2] [--image-size 224] [--repeats 3] [--profile]

224 px, the brain MRI folder, two views of the paper's pretraining augmentation. What a GPU run leaves
on the host CPU is measured per image:

- ours: ``build_loader`` over JPEG shards (``cass-shards folder --format jpg``), workers decode and
  resize to the training size and ship uint8; the main process takes the batch (and on CUDA pins and
  copies it). The augmentation (both views) and the normalisation run on the training device; here
  they are timed on their own, on CPU tensors, and printed first. Two shard sets: written at the
  training size (``--resize 224x224``: no resize in the workers) and at the source size.
- reference: ``torchvision.datasets.ImageFolder`` over the same Training/ files, with the CASS
  reference code's transforms (PIL decode, Resize, the paper's augmentation, ToTensor, Normalize: one
  view, all on the host, as the original code did), same batch size and workers.

CPU time is this process (every thread: collation, pinning) plus its DataLoader workers
(``RUSAGE_CHILDREN``, counted once they are joined at the end of each measure): meaningful on a
shared machine, where wall-clock rates fall with everyone else's load. Repeats are interleaved and
the best kept. ``--decode gpu`` (CUDA only) streams JPEG bytes and decodes them with nvJPEG on the
GPU; it prints images/s per host CPU core. The last line is the ratio of the first shard row to the
reference.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from cass_dist.data import build_loader, load_manifest
from cass_dist.data.augment import manifest_transform
from cass_dist.data.images import ImageOptions
from cass_dist.data.sources import read_folder
from cass_dist.data.writer import WriteOptions, write_shards

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_tumor_mri"


def convert(data: Path, out: Path, workers: int, resize) -> tuple[float, float]:
    """Convert ``data`` to JPEG shards in ``out``; return (images/s, megabytes on disk)."""
    start = time.perf_counter()
    options = WriteOptions(image=ImageOptions(mode="RGB", format="jpg", quality=95, resize=resize), shard_size=256,
                           workers=workers, overwrite=True, progress=False)
    manifest = write_shards(read_folder(data), out, options)
    elapsed = time.perf_counter() - start
    size = sum(s.bytes for split in manifest.splits.values() for s in split.shards) / 1e6
    return sum(s.count for s in manifest.splits.values()) / elapsed, size


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (DataLoader workers, once joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(make_source, limit: int, device: torch.device) -> tuple[float, float]:
    """Consume batches (moved to ``device``) until ``limit`` images; return (images per wall second, per CPU second).

    Both include worker start-up; the workers are stopped and joined before the CPU clock is read.
    """
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    source = make_source()
    batches = iter(source)
    for batch in batches:
        image = batch[0] if isinstance(batch, (list, tuple)) else batch["image"]
        image.to(device, non_blocking=True)
        images += len(image)
        if images >= limit:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    if hasattr(source, "close"):
        source.close()
    del source, batches
    gc.collect()  # the workers are joined here, so their CPU time is counted
    return images / wall, images / (cpu_seconds() - cpu)


def reference_transform(image_size: int, mean, std):
    """The CASS reference code's pipeline (torchvision v1 on PIL, per-sample normalisation)."""
    return T.Compose([
        T.Resize((image_size, image_size)),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2), T.RandomPerspective(distortion_scale=0.2)], p=0.3),
        T.RandomApply([T.RandomAffine(degrees=10)], p=0.3),
        T.RandomVerticalFlip(p=0.3),
        T.RandomHorizontalFlip(p=0.3),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def imagefolder_rate(root: Path, args, manifest, device) -> tuple[float, float]:
    dataset = ImageFolder(str(root), transform=reference_transform(args.image_size, manifest.image.mean,
                                                                   manifest.image.std))
    limit = min(args.images, len(dataset) // args.batch_size * args.batch_size)
    return timed(lambda: DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                    drop_last=True, pin_memory=device.type == "cuda"), limit, device)


def stream_rate(shards: Path, args, epoch: int, device, decode: str = "cpu") -> tuple[float, float]:
    def loader():
        return build_loader(shards, "train", batch_size=args.batch_size, train=True, num_workers=args.workers,
                            image_size=args.image_size, epoch=epoch, device=device, decode=decode)
    return timed(loader, min(args.images, len(loader()) * args.batch_size), device)


def augmentation_ms(shards: Path, args, device) -> float:
    """ms per image of the device transform (pretrain, two views) on ``device``, one batch after a warm-up."""
    loader = build_loader(shards, "train", batch_size=args.batch_size, train=True, image_size=args.image_size)
    transform = manifest_transform("pretrain", loader.manifest, image_size=args.image_size, views=2)
    batches = iter(loader)
    images = [next(batches)["image"].to(device) for _ in range(3)]
    transform(images[0], seed=0)
    start = time.perf_counter()
    for seed, batch in enumerate(images[1:], start=1):
        transform(batch, seed=seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / (len(images[1:]) * args.batch_size)


def profile_stream(shards: Path, args) -> None:
    """Print the top functions by own time while the in-process stream yields 512 images."""
    loader = build_loader(shards, "train", batch_size=args.batch_size, train=True, num_workers=0,
                          image_size=args.image_size)
    profiler = cProfile.Profile()
    profiler.enable()
    for i, _ in enumerate(loader):
        if (i + 1) * args.batch_size >= 512:
            break
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(14)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder with Training/ and Testing/")
    parser.add_argument("--out", type=Path, default=None, help="where the shard sets go (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=768, help="images measured per row and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best is shown")
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu", help="gpu: nvJPEG rows too (CUDA)")
    parser.add_argument("--profile", action="store_true", help="cProfile the in-process stream")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.data / "Training").is_dir():
        parser.error(f"{args.data}/Training not found; pass --data")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.decode == "gpu" and device.type != "cuda":
        parser.error("--decode gpu needs a CUDA device")

    with tempfile.TemporaryDirectory(prefix="cass-bench-") as tmp:
        root = args.out or Path(tmp)
        size = args.image_size
        sets = {f"shards {size}x{size} jpg": (root / "at-size", [size, size]), "shards source-size jpg": (root / "source", None)}
        for name, (path, resize) in sets.items():
            rate, megabytes = convert(args.data, path, args.workers, resize)
            print(f"conversion to {name}: {rate:7.1f} images/s ({args.workers} processes), {megabytes:.0f} MB on disk")
        at_size = sets[f"shards {size}x{size} jpg"][0]
        manifest = load_manifest(at_size)
        print(f"device augmentation (pretrain, 2 views, batch {args.batch_size}, on {device}): "
              f"{augmentation_ms(at_size, args, device):.2f} ms per image, off the host when training on a GPU")
        training = args.data / "Training"
        measures = {name: (lambda r, p=path: stream_rate(p, args, r, device)) for name, (path, _) in sets.items()}
        if args.decode == "gpu":
            measures["shards source-size jpg, decode gpu"] = lambda r: stream_rate(sets["shards source-size jpg"][0],
                                                                                   args, r, device, decode="gpu")
        measures["ImageFolder + CASS reference transforms"] = lambda r: imagefolder_rate(training, args, manifest,
                                                                                         device)
        best = {name: (0.0, 0.0) for name in measures}
        for repeat in range(args.repeats):  # interleaved, best kept: other processes' load only slows a run down
            for name, measure in measures.items():
                wall, cpu = measure(repeat)
                best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
        reference = best["ImageFolder + CASS reference transforms"]
        print(f"\n{size} px, two views of the paper's pretraining augmentation, batch {args.batch_size}, {args.workers} "
              f"workers, best of {args.repeats} x {args.images} images, load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores (host CPU: workers + main process; the reference does one view, on the host)")
        print(f"{'loader':<44}{'images/s':>9}{'img/CPU-s':>11}{'ratio wall':>12}{'ratio CPU':>11}")
        for name, (rate, per_cpu) in best.items():
            print(f"{name:<44}{rate:>9.1f}{per_cpu:>11.1f}{rate / reference[0]:>11.2f}x{per_cpu / reference[1]:>10.2f}x")
        if args.profile:
            profile_stream(at_size, args)
        ours = best[f"shards {size}x{size} jpg"]
        print(f"ratio vs ImageFolder reference: {ours[1] / reference[1]:.2f}x per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())

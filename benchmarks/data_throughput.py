"""Shard stream vs torchvision ImageFolder: decode + CASS pretraining augmentation at 224 px.

    python benchmarks/data_throughput.py [--data DIR] [--workers 2] [--image-size 224] [--profile]

1. Converts the brain MRI image folder to JPEG shards with cass-shards' own code and reports the
   conversion rate.
2. Streams the train split with ``build_loader(train=True)`` and, over the same Training/ files with
   the same batch size and worker count, iterates ``torchvision.datasets.ImageFolder`` three ways:
   with the CASS reference code's transforms (torchvision v1 on PIL: the baseline of the issue),
   with our uint8 transform (equal augmentation code: isolates decoder + container), and with our
   JPEG draft decoder too (isolates the container). Prints images/s per wall second and per CPU
   second (this process plus its workers: meaningful on a shared machine), and ratios.
3. ``--profile`` runs the stream in-process under cProfile and prints where the time goes.

The defaults finish in well under 3 minutes on 2 cores.
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
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as F

from cass_dist.data import build_loader, load_manifest
from cass_dist.data.images import ImageOptions
from cass_dist.data.sources import read_folder
from cass_dist.data.transforms import BatchNormalizer, decode_image, pretrain_transform
from cass_dist.data.writer import WriteOptions, write_shards

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_tumor_mri"


def convert(data: Path, out: Path, workers: int) -> float:
    """Convert ``data`` to JPEG shards in ``out``; return images/s."""
    start = time.perf_counter()
    source = read_folder(data)
    options = WriteOptions(image=ImageOptions(mode="RGB", format="jpg", quality=95), shard_size=256,
                           workers=workers, overwrite=True, progress=False)
    manifest = write_shards(source, out, options)
    elapsed = time.perf_counter() - start
    return sum(s.count for s in manifest.splits.values()) / elapsed


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers, once joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(batches, limit: int) -> tuple[float, float]:
    """Consume batches until ``limit`` images; return (images per wall second, per CPU second).

    Both include worker start-up. CPU seconds make the per-core figure meaningful on a shared,
    oversubscribed machine, where wall-clock rates fall with everyone else's load.
    """
    wall, cpu, images = time.perf_counter(), cpu_seconds(), 0
    batches = iter(batches)
    for batch in batches:
        images += len(batch[0] if isinstance(batch, (list, tuple)) else batch["key"])
        if images >= limit:
            break
    wall = time.perf_counter() - wall
    if hasattr(batches, "close"):
        batches.close()  # stops and joins the workers, so their CPU time is counted
    del batches
    gc.collect()
    return images / wall, images / (cpu_seconds() - cpu)


class PILTensorPipeline:
    """ImageFolder transform: PIL image -> uint8 tensor -> our pretraining augmentation (no draft decode)."""

    def __init__(self, image_size: int):
        self.augment = pretrain_transform(image_size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.augment(F.pil_to_tensor(img))


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


def draft_loader(image_size: int):
    """An ImageFolder loader that decodes like our stream (JPEG draft), for attribution only."""
    def load(path: str) -> torch.Tensor:
        with open(path, "rb") as fh:
            return decode_image(fh.read(), "RGB", (image_size, image_size))
    return load


def imagefolder_rate(root: Path, args, variant: str, normalize: BatchNormalizer) -> tuple[float, float]:
    """images/s of ImageFolder with the reference transforms, our transform, or our decoder + transform."""
    if variant == "reference":
        dataset = ImageFolder(str(root), transform=reference_transform(args.image_size, normalize.mean,
                                                                       normalize.std))
    elif variant == "ours":
        dataset = ImageFolder(str(root), transform=PILTensorPipeline(args.image_size))
    else:
        dataset = ImageFolder(str(root), transform=pretrain_transform(args.image_size),
                              loader=draft_loader(args.image_size))
    torch_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                              drop_last=True)
    limit = min(args.images, len(dataset) // args.batch_size * args.batch_size)
    if variant == "reference":
        return timed(torch_loader, limit)
    return timed(((normalize(x), y) for x, y in torch_loader), limit)


def stream_rate(shards: Path, args, num_workers: int, epoch: int = 0) -> tuple[float, float]:
    """(images per wall second, per CPU second) of our training stream."""
    loader = build_loader(shards, "train", batch_size=args.batch_size, train=True, num_workers=num_workers,
                          image_size=args.image_size, transform="pretrain", epoch=epoch)
    return timed(loader, min(args.images, len(loader) * args.batch_size))


def profile_stream(shards: Path, args) -> None:
    """Print the top functions by own time while the in-process stream yields 512 images."""
    loader = build_loader(shards, "train", batch_size=args.batch_size, train=True, num_workers=0,
                          image_size=args.image_size, transform="pretrain")
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
    parser.add_argument("--out", type=Path, default=None, help="shard dir (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=768, help="images measured per row and repeat")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best is shown")
    parser.add_argument("--profile", action="store_true", help="cProfile the in-process stream")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not (args.data / "Training").is_dir():
        parser.error(f"{args.data}/Training not found; pass --data")

    with tempfile.TemporaryDirectory(prefix="cass-bench-") as tmp:
        shards = args.out or Path(tmp) / "shards"
        conversion = convert(args.data, shards, args.workers)
        manifest = load_manifest(shards)
        normalize = BatchNormalizer(manifest.image.mean, manifest.image.std)
        print(f"conversion: {conversion:7.1f} images/s ({args.workers} processes, JPEG q95, "
              f"{sum(s.count for s in manifest.splits.values())} images)")
        training = args.data / "Training"
        measures = {
            "shards + build_loader": lambda r: stream_rate(shards, args, args.workers, epoch=r),
            "ImageFolder + CASS reference transforms": lambda r: imagefolder_rate(training, args, "reference",
                                                                                  normalize),
            "ImageFolder + our uint8 transform": lambda r: imagefolder_rate(training, args, "ours", normalize),
            "ImageFolder + our draft decoder + transform": lambda r: imagefolder_rate(training, args,
                                                                                      "ours+draft", normalize),
            "shards + build_loader, in-process": lambda r: stream_rate(shards, args, 0, epoch=r),
        }
        # Interleaved repeats, best kept: other processes' load only ever slows a run down.
        best = {name: (0.0, 0.0) for name in measures}
        for repeat in range(args.repeats):
            for name, measure in measures.items():
                wall, cpu = measure(repeat)
                best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
        rows = list(best.items())
        ours, reference, same_transform, _, single = best.values()
        print(f"\n{args.image_size} px pretraining augmentation, batch {args.batch_size}, "
              f"{args.workers} workers, best of {args.repeats} x {args.images} images, load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores")
        print(f"{'loader':<44}{'images/s':>9}{'img/CPU-s':>11}{'ratio wall':>12}{'ratio CPU':>11}")
        for name, (rate, per_cpu) in rows:
            print(f"{name:<44}{rate:>9.1f}{per_cpu:>11.1f}{rate / reference[0]:>11.2f}x"
                  f"{per_cpu / reference[1]:>10.2f}x")
        print(f"\ngoal >= 1.5x ImageFolder at {args.workers} workers: {ours[0] / reference[0]:.2f}x wall "
              f"({ours[1] / reference[1]:.2f}x per CPU second) vs the reference transforms, "
              f"{ours[0] / same_transform[0]:.2f}x wall ({ours[1] / same_transform[1]:.2f}x) at equal transforms")
        print(f"goal >= 400 images/s per core: {single[1]:.0f} per CPU second in-process, "
              f"{ours[1]:.0f} with {args.workers} workers (main process included)")
        if args.profile:
            profile_stream(shards, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

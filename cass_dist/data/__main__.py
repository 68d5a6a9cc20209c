"""cass-shards: convert MedMNIST npz, class folders, CSVs or the demo set to shards; verify a shard set.

    cass-shards synthetic --out shards/demo
    cass-shards medmnist breastmnist --root ../shared/data/breastmnist --out shards/breast
    cass-shards folder ../shared/data/brain_tumor_mri --resize 256 --format jpg --dedupe --out shards/mri
    cass-shards folder ../shared/data/brain_tumor_mri --resize 224x224 --format jpg --out shards/mri224
    cass-shards csv labels.csv --image-col image_path --label-col dx --out shards/ham
    cass-shards adopt my_webdataset --split train='train-*.tar' --split val='val-*.tar' --classes a,b
    cass-shards verify shards/mri
"""

from __future__ import annotations

import argparse
import sys
import time

from cass_dist.data.images import ImageError, ImageOptions
from cass_dist.data.manifest import Manifest, ManifestError
from cass_dist.data.sources import SourceData, SourceError, read_csv, read_folder, read_medmnist
from cass_dist.data.writer import WriteOptions, write_shards

SHOW_DEFAULTS = argparse.ArgumentDefaultsHelpFormatter  # every option's --help line ends with its default


def _common(parser: argparse.ArgumentParser, shard_size: int = 1000) -> None:
    parser.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    parser.add_argument("--format", choices=("png", "jpg", "npy"), default="png",
                        help="png (lossless), jpg, or npy (raw uint8: no decoding, H x W x C bytes per image)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (1-100)")
    parser.add_argument("--mode", choices=("RGB", "L"), default="RGB", help="stored colour mode")
    parser.add_argument("--resize", type=_resize, default=None,
                        help="N: the short side becomes N pixels; HxW (e.g. 224x224): exactly the training size, "
                             "so the loader's workers skip their resize")
    parser.add_argument("--shard-size", type=int, default=shard_size, help="samples per tar shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the in-split shuffle")
    parser.add_argument("--workers", type=int, default=None, help="conversion processes (default: every core)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished shard set in --out")
    parser.add_argument("--dedupe", action="store_true",
                        help="drop val/test images byte-identical to an image of an earlier split")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of train carved out as val when the data has train/test only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """Return the cass-shards argument parser."""
    parser = argparse.ArgumentParser(prog="cass-shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="medmnist, folder, csv, synthetic or verify (cass-shards COMMAND --help)")

    p = sub.add_parser("medmnist", formatter_class=SHOW_DEFAULTS, help="a 2D MedMNIST dataset from its official npz")
    p.add_argument("flag", help="dataset flag, e.g. breastmnist, chestmnist, retinamnist")
    p.add_argument("--size", type=int, default=28, choices=(28, 64, 128, 224), help="MedMNIST+ image size in pixels")
    p.add_argument("--root", default=None, help="directory holding <flag>.npz (offline); default: download")
    _common(p)

    p = sub.add_parser("folder", formatter_class=SHOW_DEFAULTS, help="class folders, optionally inside split folders")
    p.add_argument("dir", help="DIR/<class>/* or DIR/<split>/<class>/* (Training/Testing, train/val/test)")
    _common(p)

    p = sub.add_parser("csv", formatter_class=SHOW_DEFAULTS, help="a CSV of image paths and labels")
    p.add_argument("file", help="CSV with a header row")
    p.add_argument("--image-col", required=True, help="column holding each image's path")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--label-col", help="one column of class names or ids (multi-class)")
    labels.add_argument("--label-cols", help="comma-separated 0/1 columns (multi-label)")
    p.add_argument("--classes", default=None, help="comma-separated class names, in id order (--label-col)")
    p.add_argument("--group-col", default=None, help="patient/slide column: a group never spans two splits")
    p.add_argument("--split-col", default=None, help="column holding train/val/test")
    p.add_argument("--root", default=None, help="image paths are relative to this (default: the CSV's dir)")
    _common(p)

    p = sub.add_parser("synthetic", formatter_class=SHOW_DEFAULTS, help="the built-in deterministic demo set")
    p.add_argument("--num-images", type=int, default=3000, help="images in all splits together")
    p.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    p.add_argument("--num-classes", type=int, default=6, help="learnable pattern classes")
    _common(p, shard_size=500)

    p = sub.add_parser("adopt", formatter_class=SHOW_DEFAULTS,
                       help="describe existing WebDataset shards: write their indexes and manifest.json")
    p.add_argument("dir", help="directory holding the tars (they are read, never changed)")
    p.add_argument("--split", action="append", required=True, metavar="NAME=GLOB",
                   help="a split and the tars that hold it, e.g. train='train-*.tar' (repeat per split)")
    p.add_argument("--classes", required=True, help="class names in id order: a,b,c or a JSON list")
    p.add_argument("--task", choices=("multi-class", "binary", "multi-label"), default="multi-class",
                   help="what the labels are: one class id, a binary label, or a 0/1 vector per sample")
    p.add_argument("--mode", choices=("RGB", "L"), default="RGB", help="colour mode the images are read in")

    p = sub.add_parser("verify", formatter_class=SHOW_DEFAULTS,
                       help="re-read every shard and check it against the manifest")
    p.add_argument("dir", nargs="?", help="shard directory (or give --out)")
    p.add_argument("--out", default=None, help="same as DIR")
    p.add_argument("--no-decode", action="store_true", help="skip decoding the images")
    return parser


def _resize(text: str) -> int | list[int]:
    """``--resize`` value: a short side ("256") or an exact size ("224x224")."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts, default=0) < 1:
        raise argparse.ArgumentTypeError(f"expected a short side N or HxW with positive integers, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _names(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _read(args: argparse.Namespace) -> SourceData:
    if args.command == "medmnist":
        return read_medmnist(args.flag, size=args.size, root=args.root)
    if args.command == "folder":
        return read_folder(args.dir)
    if args.command == "csv":
        return read_csv(args.file, image_col=args.image_col, label_col=args.label_col,
                        label_cols=_names(args.label_cols), group_col=args.group_col,
                        split_col=args.split_col, root=args.root, classes=_names(args.classes))
    from cass_dist.data.synthetic import synthetic_source

    return synthetic_source(num_images=args.num_images, image_size=args.image_size,
                            num_classes=args.num_classes, seed=args.seed)


def _summary(manifest: Manifest, out: str, seconds: float) -> str:
    total = sum(s.count for s in manifest.splits.values())
    lines = [f"wrote {total} images to {out} in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s); "
             f"task {manifest.task}, {manifest.num_classes} classes"]
    for name, split in manifest.splits.items():
        lines.append(f"  {name}: {split.count} images in {len(split.shards)} shard(s), per class {split.class_counts}")
    d = manifest.duplicates
    if d.get("cross_split_groups"):
        lines.append(f"  byte-identical images across splits: {d['cross_split_groups']} groups "
                     f"({d['cross_split_samples']} images; {d['by_pair']}); dropped by --dedupe: {d['dropped']}")
    else:
        lines.append("  byte-identical images across splits: none")
    return "\n".join(lines)


def _convert(args: argparse.Namespace, argv: list[str]) -> int:
    start = time.perf_counter()
    data = _read(args)
    data.args["argv"] = argv
    options = WriteOptions(image=ImageOptions(mode=args.mode, format=args.format, quality=args.quality,
                                              resize=args.resize),
                           shard_size=args.shard_size, seed=args.seed, workers=args.workers,
                           overwrite=args.overwrite, dedupe=args.dedupe, val_fraction=args.val_fraction,
                           progress=not args.no_progress)
    manifest = write_shards(data, args.out, options)
    print(_summary(manifest, args.out, time.perf_counter() - start))
    return 0


def _adopt(args: argparse.Namespace) -> int:
    from cass_dist.data.adopt import adopt_shards, parse_class_names

    splits = {}
    for item in args.split:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"--split: expected NAME=GLOB, got {item!r}")
        splits[name] = pattern
    manifest = adopt_shards(args.dir, splits, class_names=parse_class_names(args.classes), task=args.task,
                            mode=args.mode)
    counts = ", ".join(f"{name} {split.count}" for name, split in manifest.splits.items())
    print(f"{args.dir}: described {counts} samples ({manifest.image.format}); wrote manifest.json")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cass_dist.data.verify import verify_shards

    target = args.dir or args.out
    if not target:
        raise ValueError("verify needs a shard directory (DIR or --out)")
    problems = verify_shards(target, decode=not args.no_decode)
    if problems:
        print(f"{target}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{target}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run cass-shards; return 0 on success, 1 when verify finds problems, 2 on bad input, 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return int(exc.code or 0)
    try:
        if args.command in ("verify", "adopt"):
            return _verify(args) if args.command == "verify" else _adopt(args)
        return _convert(args, argv)
    except (SourceError, ImageError, ManifestError, ValueError, OSError) as exc:
        print(f"cass-shards: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cass-shards: interrupted; nothing finished was written (run again to convert)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Which CASS objective should be the default? Pretrain each candidate from scratch and probe it.

For every candidate objective and seed: pretrain CASS (resnet18 + vit_tiny; ViT patch 7 at 28 px gives
16 tokens, patch 4 gives 49, where the original patch 16 at 32 px gives 4) on the train split of a MedMNIST npz without labels, with the product's
pretraining augmentation; then freeze both backbones and score their pooled features on the test split
with weighted cosine kNN (k=20) and a linear probe (C chosen on val), against the same seed's random
init and raw pixels. Also reports the embedding std (times sqrt(D): 1 is healthy, 0 collapsed) and the
effective rank on a fixed val batch.

Results go to a JSON file after every run, so an interrupted benchmark resumes where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/objectives.py --data ../shared/data/pneumoniamnist/pneumoniamnist.npz
    python benchmarks/objectives.py --data ... --table-only      # the markdown table of the results so far

The defaults are the setup behind docs/objectives.md (about 2 CPU-minutes a run on one core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cass_dist.data.transforms import BatchNormalizer, eval_transform, pretrain_transform
from cass_dist.engine.probe import knn_predict, linear_probe
from cass_dist.losses import build_objective
from cass_dist.models import CASS, CASSPretrainer
from cass_dist.monitor import embedding_stats

# name -> (objective, objective kwargs, CASS head). The paper's head is the 1000-way timm classifier.
CANDIDATES: dict[str, tuple[str, dict, str]] = {
    "paper": ("paper", {}, "linear"),
    "vicreg": ("vicreg", {}, "linear"),
    "barlow": ("barlow", {}, "linear"),
    "simsiam": ("simsiam", {}, "linear"),
    "vicreg-mlp": ("vicreg", {}, "mlp"),
    "barlow-mlp": ("barlow", {}, "mlp"),
}


@dataclass
class BenchConfig:
    data: str
    candidates: list[str] = field(default_factory=lambda: ["paper", "vicreg", "barlow", "simsiam"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    cnn: str = "resnet18"
    vit: str = "vit_tiny_patch16_224"
    image_size: int = 28  # MedMNIST native size
    patch_size: int = 7  # 16 tokens at 28 px; 4 (49 tokens) costs ~3x more
    embed_dim: int = 1000
    batch_size: int = 64
    steps: int = 80
    warmup: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    probe_train: int = 1000  # labelled train images the probes fit on (a fixed random subset)
    probe_val: int = 200
    threads: int = 1  # on a shared 2-core machine, 2 threads ran ~5x slower than 1
    out: str = "runs/benchmarks/objectives.json"


def load_npz(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return {split: (uint8 images N x C x H x W, int64 labels N)} from a MedMNIST npz."""
    arrays = np.load(path)
    splits = {}
    for split in ("train", "val", "test"):
        images = torch.from_numpy(arrays[f"{split}_images"])
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        splits[split] = (images.contiguous(), torch.from_numpy(arrays[f"{split}_labels"]).view(-1).long())
    return splits


def subset(pair: tuple[torch.Tensor, torch.Tensor], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a fixed random subset of n samples (all of them when n >= N)."""
    images, labels = pair
    if n >= len(images):
        return pair
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def pretrain(cfg: BenchConfig, model: CASS, objective_name: str, objective_kwargs: dict,
             train_images: torch.Tensor, normalise: BatchNormalizer, seed: int) -> list[float]:
    """Train ``model`` in place with the objective; returns the loss of every step."""
    pretrainer = CASSPretrainer(model, build_objective(objective_name, embed_dim=cfg.embed_dim, **objective_kwargs))
    groups = pretrainer.param_groups(lr_cnn=cfg.lr, lr_vit=cfg.lr, weight_decay_cnn=cfg.weight_decay,
                                     weight_decay_vit=cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    augment = pretrain_transform(cfg.image_size)
    generator = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(2000 + seed)  # the augmentation draws from the global generator
    pretrainer.train()
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(train_images), (cfg.batch_size,), generator=generator)
        batch = normalise(torch.stack([augment(img) for img in train_images[idx]]))
        out = pretrainer(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        scheduler.step()
        losses.append(out["loss"].item())
    return losses


@torch.no_grad()
def features(model: CASS, images: torch.Tensor, cfg: BenchConfig, normalise: BatchNormalizer):
    """Return pooled backbone features (cnn, vit) of uint8 ``images`` at the eval transform."""
    model.eval()
    resize = eval_transform(cfg.image_size)
    cnn, vit = [], []
    for start in range(0, len(images), 256):
        batch = normalise(resize(images[start:start + 256]))
        f_cnn, f_vit = model.features(batch)
        cnn.append(f_cnn)
        vit.append(f_vit)
    return torch.cat(cnn), torch.cat(vit)


def probe(train: tuple, val: tuple, test: tuple, num_classes: int) -> dict[str, float]:
    """Return test accuracy (%) of kNN (k=20, cosine, weighted) and of a linear probe (C chosen on val)."""
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = train, val, test
    knn = knn_predict(x_tr, y_tr, x_te, num_classes=num_classes, k=20).argmax(1)
    linear = linear_probe(x_tr, y_tr, x_va, y_va, Cs=(0.01, 0.1, 1.0), max_iter=300).predict(x_te.numpy())
    return {"knn": 100.0 * float((knn == y_te).float().mean()),
            "linear": 100.0 * float((torch.from_numpy(linear) == y_te).float().mean())}


def evaluate(model: CASS, cfg: BenchConfig, data: dict, normalise: BatchNormalizer, num_classes: int) -> dict:
    """Return probe accuracies per branch and embedding stats on a fixed val batch."""
    feats = {split: features(model, data[split][0], cfg, normalise) for split in ("train", "val", "test")}
    result = {}
    for b, name in enumerate(("cnn", "vit")):
        scores = probe(*((feats[s][b], data[s][1]) for s in ("train", "val", "test")), num_classes)
        result.update({f"{name}_{k}": v for k, v in scores.items()})
    with torch.no_grad():
        z_cnn, z_vit = model(normalise(eval_transform(cfg.image_size)(data["val"][0][:256])))
    for name, z in (("cnn", z_cnn), ("vit", z_vit)):
        stats = embedding_stats(z)
        result[f"{name}_std_x_sqrt_d"] = stats["std"] * math.sqrt(stats["dim"])
        result[f"{name}_eff_rank"] = stats["eff_rank"]
    return result


def raw_pixels(cfg: BenchConfig, data: dict, num_classes: int) -> dict:
    """Return probe accuracies on raw pixels at the benchmark's image size."""
    resize = eval_transform(cfg.image_size)
    flat = {s: (resize(data[s][0]).float().flatten(1) / 255.0, data[s][1]) for s in ("train", "val", "test")}
    scores = probe(flat["train"], flat["val"], flat["test"], num_classes)
    return {f"pixels_{k}": v for k, v in scores.items()}


def run(cfg: BenchConfig) -> dict:
    """Run every (candidate, seed) not yet in ``cfg.out``; returns all results (also written there)."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    results = json.loads(out.read_text()) if out.is_file() else {"config": asdict(cfg), "runs": {}}
    same = ("candidates", "seeds", "threads", "out")
    old = {k: v for k, v in results["config"].items() if k not in same}
    if old != {k: v for k, v in asdict(cfg).items() if k not in same}:
        raise ValueError(f"{out} holds results of another setup ({old}); pass another --out")
    splits = load_npz(cfg.data)
    num_classes = int(splits["train"][1].max()) + 1
    data = {"train": subset(splits["train"], cfg.probe_train, 0), "val": subset(splits["val"], cfg.probe_val, 0),
            "test": splits["test"]}
    pixels = splits["train"][0].float() / 255.0
    normalise = BatchNormalizer([float(pixels.mean())], [float(pixels.std())], channels=3)
    if "raw_pixels" not in results["runs"]:
        results["runs"]["raw_pixels"] = raw_pixels(cfg, data, num_classes)
        _save(out, results)
    for seed in cfg.seeds:
        for name in ["random_init", *cfg.candidates]:
            key = f"{name}/seed{seed}"
            if key in results["runs"]:
                continue
            started = time.time()
            torch.manual_seed(seed)  # the same initial weights for every candidate of a seed
            objective, kwargs, head = CANDIDATES.get(name, ("paper", {}, "linear"))
            model = CASS(cfg.cnn, cfg.vit, embed_dim=cfg.embed_dim, head=head, img_size=cfg.image_size,
                         vit_patch_size=cfg.patch_size)
            losses = []
            if name != "random_init":
                losses = pretrain(cfg, model, objective, kwargs, splits["train"][0], normalise, seed)
            record = evaluate(model, cfg, data, normalise, num_classes)
            record["final_loss"] = statistics.fmean(losses[-10:]) if losses else float("nan")
            record["first_loss"] = statistics.fmean(losses[:5]) if losses else float("nan")
            record["seconds"] = time.time() - started
            results["runs"][key] = record
            _save(out, results)
            print(f"{key}: " + ", ".join(f"{k}={v:.3g}" for k, v in record.items()), flush=True)
    return results


def table(results: dict) -> str:
    """Return a markdown table of mean +- std over seeds for every method."""
    columns = ["cnn_knn", "cnn_linear", "vit_knn", "vit_linear", "cnn_std_x_sqrt_d", "cnn_eff_rank",
               "vit_std_x_sqrt_d", "vit_eff_rank", "final_loss"]
    runs = results["runs"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    pixels = runs.get("raw_pixels")
    if pixels:
        lines.append(f"| raw pixels | {pixels['pixels_knn']:.1f} | {pixels['pixels_linear']:.1f} | "
                     + " | ".join("-" for _ in columns[2:]) + " |")
    methods = dict.fromkeys(k.split("/")[0] for k in runs if "/" in k)
    for method in methods:
        records = [v for k, v in runs.items() if k.split("/")[0] == method]
        cells = []
        for col in columns:
            values = [r[col] for r in records if not math.isnan(r[col])]
            if not values:
                cells.append("-")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            digits = 3 if col == "final_loss" else (2 if "std" in col else 1)
            cells.append(f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}")
        lines.append(f"| {method} (n={len(records)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig(data="")
    parser.add_argument("--data", required=True, help="a MedMNIST .npz file")
    parser.add_argument("--candidates", nargs="+", default=defaults.candidates, choices=sorted(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=defaults.seeds)
    for name in ("image_size", "patch_size", "embed_dim", "batch_size", "steps", "warmup", "probe_train",
                 "probe_val", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--cnn", default=defaults.cnn)
    parser.add_argument("--vit", default=defaults.vit)
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--table-only", action="store_true", help="print the table of an existing --out file")
    args = vars(parser.parse_args())
    table_only = args.pop("table_only")
    cfg = BenchConfig(**args)
    results = json.loads(Path(cfg.out).read_text()) if table_only else run(cfg)
    print(table(results))


if __name__ == "__main__":
    main()

"""Does CASS pretraining help downstream? Measured through the product, on a real MedMNIST set, on CPU.

For each seed, on the shards made by ``cass-shards medmnist``:

1. probes on frozen features (weighted cosine kNN, k=20; logistic regression, C chosen on val) of
   - raw pixels (no model),
   - random-init backbones (resnet18 + vit_tiny, the same architecture as pretraining),
   - CASS-pretrained backbones with the defaults (``engine.pretrain``, the ``demo`` preset adapted
     to 28 px: ViT patch 7; the default objective, two views, 600 steps),
   - CASS-pretrained backbones with the paper objective (``--objective paper``, one shared view);
2. fine-tuning (``engine.finetune``) at 10% of the training labels from each init, of each branch
   (CNN, ViT, both), at each setting of a small grid (lrs, crossed with layer-wise lr decays when
   ``--ft-layer-decays`` names any); the table also gives, per init and branch, the test metrics at
   the setting each seed's validation F1 picks, which is the comparison a user can make.

Every unit of work is written to ``<work>/results.json`` as soon as it is done, so an interrupted run
resumes where it stopped, and processes started on one work dir with different ``--seeds`` share
it; ``--table`` only prints the table of what is there.

    OMP_NUM_THREADS=1 python benchmarks/pretraining_helps.py --root ../shared/data/pneumoniamnist
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the table helpers live beside this file
from cass_vs_baselines_tables import chosen_on_val, mean_std, paired  # noqa: E402

from cass_dist.configs.finetune import DownstreamModelSection, parse_finetune_config  # noqa: E402
from cass_dist.configs.pretrain import parse_pretrain_config  # noqa: E402
from cass_dist.data import build_loader  # noqa: E402
from cass_dist.data.manifest import MANIFEST_NAME, write_json_atomic  # noqa: E402
from cass_dist.engine.classifier import build_backbone  # noqa: E402
from cass_dist.engine.finetune import finetune  # noqa: E402
from cass_dist.engine.pretrain import pretrain  # noqa: E402
from cass_dist.engine.probe import extract_features, knn_predict, linear_probe, probe_probabilities  # noqa: E402
from cass_dist.metrics import compute_metrics  # noqa: E402

INITS = ("random", "cass", "paper")  # cass = the default objective
METRICS = ("accuracy", "f1_macro", "auroc_macro", "balanced_accuracy")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pneumoniamnist", help="MedMNIST flag (pneumoniamnist, breastmnist)")
    p.add_argument("--root", default="../shared/data/pneumoniamnist", help="folder holding <dataset>.npz")
    p.add_argument("--work", default="runs/benchmarks/pretraining_helps", help="shards, runs and results.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--patch", type=int, default=7, help="ViT patch size (28 px / 7 = 16 tokens)")
    p.add_argument("--steps", type=int, default=600, help="pretraining steps (default objective, two views)")
    p.add_argument("--paper-steps", type=int, default=120,
                   help="pretraining steps of the paper objective: it collapses within ~20, more change nothing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cass-flags", default="", help="extra launch/pretrain.py flags for the default-objective "
                   "run, e.g. '--views 1' for the paper's one shared view (the paper-objective run stays the paper's)")
    p.add_argument("--probe-fraction", type=float, default=0.5, help="share of train labels the probes fit on")
    p.add_argument("--ft-fraction", type=float, default=0.1, help="label fraction for fine-tuning")
    p.add_argument("--ft-steps", type=int, default=150, help="fine-tuning steps (batch 32), whatever the dataset size")
    p.add_argument("--ft-eval-every", type=int, default=10, help="steps between validations")
    p.add_argument("--ft-patience", type=int, default=5, help="early-stopping patience in validations (0: off)")
    p.add_argument("--ft-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3],
                   help="fine-tuning lrs (AdamW, warmup + cosine); each init gets the one its val F1 picks")
    p.add_argument("--ft-layer-decays", type=float, nargs="+", default=[1.0],
                   help="layer-wise lr decays crossed with --ft-lrs (1: off); val F1 picks among all settings")
    p.add_argument("--ft-branches", nargs="+", default=["cnn", "vit", "both"], choices=["cnn", "vit", "both"],
                   help="branches fine-tuned (both: the CNN's and the ViT's probabilities averaged)")
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    p.add_argument("--small-stem", action="store_true",
                   help="give every init's CNN the small stem (stride-1 3x3, no max-pool); off: timm's stem for all, "
                        "the demo preset's, which the recorded figures used")
    p.add_argument("--stages", nargs="+", default=["probes", "finetune"], choices=["probes", "finetune"])
    p.add_argument("--table", action="store_true", help="only print the table of the results so far")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.shards = self.work / "shards" / args.dataset
        self.results_path = self.work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}

    def done(self, key: str) -> bool:
        return key in self.results

    def locked(self):
        """An exclusive lock on the work dir: several processes (one per seed, say) may share it."""
        return _exclusive_lock(self.work / "results.lock")

    def record(self, key: str, value: dict) -> None:
        with self.locked():  # re-read first: another process may have recorded since
            if self.results_path.is_file():
                self.results = json.loads(self.results_path.read_text())
            self.results[key] = value
            write_json_atomic(self.results_path, self.results)
        print(f"{key}: {json.dumps(value)}", flush=True)

    # ------------------------------------------------------------------ the stages
    def make_shards(self) -> None:
        from cass_dist.data.__main__ import main as cass_shards

        with self.locked():
            if (self.shards / MANIFEST_NAME).is_file():
                return
            code = cass_shards(["medmnist", self.args.dataset, "--root", self.args.root, "--out", str(self.shards)])
        if code:
            raise SystemExit(f"cass-shards failed with exit code {code}")

    def loader(self, split: str, fraction: float = 1.0, channels: int | None = 3):
        return build_loader(self.shards, split, batch_size=256, train=False, image_size=self.args.image_size,
                            transform="eval", label_fraction=fraction, channels=channels)

    def probe(self, backbone: torch.nn.Module) -> dict:
        """kNN and linear-probe test metrics of one frozen backbone."""
        splits = {"train": self.loader("train", self.args.probe_fraction), "val": self.loader("val"),
                  "test": self.loader("test")}
        feats = {name: extract_features(backbone, loader) for name, loader in splits.items()}
        manifest = splits["test"].manifest
        (xt, yt, _), (xv, yv, _), (xq, yq, _) = feats["train"], feats["val"], feats["test"]
        knn = knn_predict(xt, yt, xq, num_classes=manifest.num_classes, k=20)
        linear = linear_probe(xt, yt, xv, yv, Cs=(0.01, 0.1, 1.0), max_iter=500)
        out = {}
        for name, probs in (("knn", knn), ("linear", torch.as_tensor(probe_probabilities(linear, xq, manifest.num_classes)))):
            m = compute_metrics(probs, yq, task=manifest.task)
            out[name] = {k: m[k] for k in ("accuracy", "f1_macro", "auroc_macro", "balanced_accuracy")}
        return out

    def raw_pixels(self) -> None:
        if self.done("pixels"):
            return
        self.record("pixels", self.probe(_MeanChannelPixels()))

    def pretrain_run(self, objective: str, seed: int) -> Path:
        out = self.work / "pretrain" / f"{objective}-seed{seed}"
        if (out / "export" / "model.json").is_file():
            return out
        a = self.args
        steps = a.paper_steps if objective == "paper" else a.steps
        argv = ["--preset", "demo", "--data", str(self.shards), "--image-size", str(a.image_size),
                "--model.vit_patch_size", str(a.patch), "--max-steps", str(steps), "--batch-size",
                str(a.batch_size), "--save-every", "0", "--knn-every", "0", "--log-every", "10",
                "--seed", str(seed), "--output-dir", str(out), "--resume", "auto", *self.stem_flags()]
        if objective == "paper":  # exactly the paper: its loss on the linear (timm classifier) heads, one view
            argv += ["--objective", "paper", "--head", "linear", "--views", "1"]
        else:
            argv += shlex.split(a.cass_flags)
        started = time.time()
        summary = self.pretrain_to_the_end(argv)
        self.record(f"pretrain/{objective}/seed{seed}", {
            "final_loss": summary.final_loss, "embed_std_cnn": summary.embed_std_cnn,
            "embed_std_vit": summary.embed_std_vit, "seconds": time.time() - started})
        return out

    @staticmethod
    def pretrain_to_the_end(argv: list[str]):
        """Run (or resume) one pretraining and return its summary; one stopped by a signal is never recorded.

        A stopped run writes its summary and checkpoint but no export: recording it would pass a
        partial run off as complete, so the harness stops and the same command resumes it.
        """
        summary = pretrain(parse_pretrain_config(argv))
        if summary.stopped_by:
            out = argv[argv.index("--output-dir") + 1]
            raise SystemExit(f"pretraining {out} was stopped by {summary.stopped_by} at step {summary.steps}: "
                             "run the same command again to resume it")
        return summary

    def init_path(self, init: str, seed: int) -> str:
        if init == "random":
            return "random"
        return str(self.pretrain_run("default" if init == "cass" else "paper", seed))

    def stem_flags(self) -> list[str]:
        """The same CNN stem for every contender: pretraining and a random init would otherwise differ
        (the demo preset keeps timm's stem, a random init at <= 64 px gets the small one)."""
        return ["--model.small_stem", "true" if self.args.small_stem else "false"]

    cnn, vit = "resnet18", "vit_tiny_patch16_224"  # every contender's architectures

    def model_section(self, init: str) -> DownstreamModelSection:
        return DownstreamModelSection(init=init, cnn=self.cnn, vit=self.vit,
                                      vit_kwargs={"img_size": self.args.image_size, "patch_size": self.args.patch},
                                      small_stem=self.args.small_stem)

    def probes(self, init: str, seed: int) -> None:
        key = f"probe/{init}/seed{seed}"
        if self.done(key):
            return
        path = self.init_path(init, seed)
        result = {}
        for branch in ("cnn", "vit"):
            torch.manual_seed(seed)  # random init: each seed its own weights
            backbone, _ = build_backbone(self.model_section(path), branch, self.args.image_size)
            result[branch] = self.probe(backbone)
        self.record(key, result)

    def finetune(self, init: str, branch: str, seed: int, lr: float, layer_decay: float) -> None:
        setting = _setting_name(lr, layer_decay)
        key = f"finetune/{init}/{branch}/seed{seed}/{setting}"
        if self.done(key):
            return
        a = self.args
        out = self.work / "finetune" / f"{init}-{branch}-seed{seed}-{setting}"
        cfg = parse_finetune_config([
            "--data", str(self.shards), "--init", self.init_path(init, seed), "--branch", branch,
            "--model.vit_kwargs", json.dumps({"img_size": a.image_size, "patch_size": a.patch}),
            "--label-fraction", str(a.ft_fraction), "--image-size", str(a.image_size), "--batch-size", "32",
            "--max-steps", str(a.ft_steps), "--eval-every", str(a.ft_eval_every), "--patience", str(a.ft_patience),
            "--lr", f"{lr:.10f}", "--layer-decay", str(layer_decay), "--warmup-steps", "10", "--precision", "fp32", "--seed", str(seed),
            "--output-dir", str(out), "--log-every", "5", *self.stem_flags()])
        result = finetune(cfg)
        self.record(key, {split: {m: result[split][m] for m in METRICS} for split in ("val", "test")}
                    | {"best_step": result["best_step"], "steps": result["steps"]})
        # the resumable state (weights and optimizer, ~130 MB a CNN run) is dead once the result is
        # recorded; a full grid would otherwise fill tens of GB. best/ and export/ stay for inspection.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    def run(self) -> None:
        self.make_shards()
        stages = self.args.stages
        if "probes" in stages:
            self.raw_pixels()
        for init in self.args.inits:
            for seed in self.args.seeds:
                if "probes" in stages:
                    self.probes(init, seed)
                if "finetune" in stages:
                    for branch in self.args.ft_branches:
                        for lr, layer_decay in _settings(self.args):
                            self.finetune(init, branch, seed, lr, layer_decay)


@contextmanager
def _exclusive_lock(path: Path):
    with open(path, "w") as handle:  # closing releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class _MeanChannelPixels(torch.nn.Module):
    """The 'no model' baseline: normalised pixels, channels averaged (MedMNIST grey images stored as RGB)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=1).flatten(1)


def _settings(args: argparse.Namespace) -> list[tuple[float, float]]:
    return [(lr, decay) for decay in args.ft_layer_decays for lr in args.ft_lrs]


def _setting_name(lr: float, layer_decay: float) -> str:
    # layer decay 1 (off) keeps the plain name, so results recorded before the flag existed still count
    return f"lr{lr:g}" if layer_decay == 1 else f"lr{lr:g}-ld{layer_decay:g}"


# ----------------------------------------------------------------------------- the table
NAMES = {"random": "random init", "cass": "CASS (default objective)", "paper": "CASS (paper objective)"}


def _finetune_row(label: str, branch: str, lr: str, rows: list[dict]) -> str:
    cells = [mean_std([r["test"][m] for r in rows]) for m in ("accuracy", "f1_macro", "auroc_macro")]
    return f"| {label} | {branch} | {lr} | " + " | ".join(cells) + f" | {mean_std([r['val']['f1_macro'] for r in rows])} | {len(rows)} |"


def _finetune_runs(results: dict, init: str, branch: str, seeds: list[int], settings: list[str]) -> dict[int, dict]:
    """Per seed, the fine-tuning runs recorded for each setting: ``{seed: {setting: run}}``."""
    return {s: {name: results[k] for name in settings if (k := f"finetune/{init}/{branch}/seed{s}/{name}") in results}
            for s in seeds}


def _chosen(runs: dict[int, dict], settings: list[str]) -> dict[int, tuple[str, dict]]:
    """Per seed whose grid is complete, the setting its best checkpoint's validation F1 (then AUROC) picks."""
    return {s: chosen_on_val(by_setting) for s, by_setting in runs.items() if len(by_setting) == len(settings)}


def _paired_rows(results: dict, seeds: list[int], settings: list[str], branches: list[str]) -> list[str]:
    """Each pretrained init minus random init on the same seed and branch: probes, and fine-tuning chosen on val."""
    def probe(init, branch, name):
        return {s: results[k][branch][name]["accuracy"] for s in seeds
                if (k := f"probe/{init}/seed{s}") in results and branch in results[k]}

    def tuned(init, branch, metric):
        return {s: run["test"][metric] for s, (_, run) in
                _chosen(_finetune_runs(results, init, branch, seeds, settings), settings).items()}

    lines = ["| paired by seed | branch | kNN acc | linear acc | fine-tuned acc (setting val picks) "
             "| fine-tuned F1 | fine-tuned AUROC |", "|---|---|---|---|---|---|---|"]
    for init in ("cass", "paper"):
        for branch in branches:
            cells = [paired(probe(init, branch, p), probe("random", branch, p)) for p in ("knn", "linear")]
            cells += [paired(tuned(init, branch, m), tuned("random", branch, m)) for m in ("accuracy", "f1_macro", "auroc_macro")]
            if any(c != "-" for c in cells):
                lines.append(f"| {NAMES[init]} minus random init | {branch} | " + " | ".join(cells) + " |")
    return lines


def table(results: dict, seeds: list[int], fraction: float, settings: list[str], branches: list[str]) -> str:
    """Return the markdown tables: test metrics (%), mean ± std over seeds, then paired differences."""
    lines = ["| features / init | probe | CNN acc | CNN F1 | ViT acc | ViT F1 | seeds |", "|---|---|---|---|---|---|---|"]
    if "pixels" in results:
        for probe in ("knn", "linear"):
            p = results["pixels"][probe]
            lines.append(f"| raw pixels | {probe} | {100 * p['accuracy']:.1f} | {100 * p['f1_macro']:.1f} | - | - | - |")
    for init, label in NAMES.items():
        runs = [results[f"probe/{init}/seed{s}"] for s in seeds if f"probe/{init}/seed{s}" in results]
        if not runs:
            continue
        for probe in ("knn", "linear"):
            cells = [mean_std([r[b][probe][m] for r in runs]) for b in ("cnn", "vit") for m in ("accuracy", "f1_macro")]
            lines.append(f"| {label} | {probe} | " + " | ".join(cells) + f" | {len(runs)} |")
    lines += ["", f"| fine-tuning ({fraction:g} of the labels) | branch | setting | test acc | test F1 | test AUROC "
              "| val F1 | seeds |", "|---|---|---|---|---|---|---|---|"]
    for branch in branches:
        for init, label in NAMES.items():
            runs = _finetune_runs(results, init, branch, seeds, settings)
            for name in settings:
                rows = [runs[s][name] for s in seeds if name in runs[s]]
                if rows:
                    lines.append(_finetune_row(label, branch, name, rows))
            chosen = _chosen(runs, settings)  # what a user can do: pick on val, never on test
            if chosen and len(settings) > 1:
                picked = ", ".join(name for name, _ in chosen.values())
                lines.append(_finetune_row(f"**{label}**", branch, f"**chosen on val** ({picked})",
                                           [run for _, run in chosen.values()]))
    lines += ["", "Paired differences, points, mean ± std over seeds (seeds the pretrained init is ahead):", ""]
    lines += _paired_rows(results, seeds, settings, branches)
    lines += ["", "| pretraining | final loss | embedding std x sqrt(D), CNN | ViT | seeds |", "|---|---|---|---|---|"]
    for objective in ("default", "paper"):
        runs = [results[f"pretrain/{objective}/seed{s}"] for s in seeds if f"pretrain/{objective}/seed{s}" in results]
        if runs:
            # demo preset: D = 128; healthy spread is 1, collapse is 0
            std = {b: statistics.fmean(r[f"embed_std_{b}"] * math.sqrt(128) for r in runs) for b in ("cnn", "vit")}
            loss = statistics.fmean(r["final_loss"] for r in runs)
            lines.append(f"| {objective} | {loss:.4f} | {std['cnn']:.3f} | {std['vit']:.3f} | {len(runs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bench = Bench(args)
    if not args.table:
        bench.run()
    settings = [_setting_name(lr, decay) for lr, decay in _settings(args)]
    text = table(bench.results, args.seeds, args.ft_fraction, settings, args.ft_branches)
    print(text)
    (bench.work / "table.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Is CASS worth it? CASS against DINO, supervised training and raw pixels, side by side, through the product.

Per dataset (PneumoniaMNIST and BreastMNIST at 28 px, the brain MRI folder at 64 px) and seed:

1. pretraining without labels on the train split, at two budgets: equal STEPS (``--steps`` each) and
   equal WALL-CLOCK (each method gets the seconds CASS-defaults took for ``--steps``, converted to
   its own steps with its own measured seconds per step). Contenders: ``cass`` (the defaults),
   ``cass-paper`` (the paper objective: its loss on the linear heads, one shared view), ``dino-vit``
   and ``dino-cnn`` (``--method dino``, its defaults). resnet18 + vit_tiny (patch = image / 4, 16
   tokens), the ``demo`` preset's optimizer; each run records its seconds per step and per epoch
   (training only, on this machine: the paper's "69% less time than DINO" is a ratio of these);
2. kNN and linear probes (frozen features, test split) of every exported backbone, of random-init
   backbones and of raw pixels;
3. fine-tuning F1 and AUROC at each ``--ft-fractions`` of the labels, from each pretrained backbone
   and from random init (the supervised baseline), at each ``--ft-lrs``; the tables use the lr each
   seed's validation F1 picks, and give paired differences (same seed) of CASS against the others.

``--stages time`` times every contender side by side instead: one process pretrains each in turn for
``--time-steps`` steps on this machine and records its seconds per step (the median of the log windows
after the first), so the paper's time claim is checked in minutes on any machine; the equal
wall-clock budget converts with these timings first (see ``Study.steps_for``).

Every unit of work lands in ``<work>/<dataset>/results.json`` as soon as it is done (the store,
locking, shards and probes are ``pretraining_helps.Bench``'s), so an interrupted run resumes and
processes with different ``--seeds`` can share a work dir; ``--table`` only prints the tables.

    OMP_NUM_THREADS=1 python benchmarks/cass_vs_baselines.py --quick          # minutes: the plumbing
    OMP_NUM_THREADS=1 python benchmarks/cass_vs_baselines.py                  # the full study
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared benchmark harness lives beside this file
from cass_vs_baselines_tables import (  # noqa: E402
    CONTENDERS,
    PRETRAINED,
    all_tables,
    budget_of,
    equal_time_steps,
    machine_of,
    same_machine,
)
from pretraining_helps import METRICS, Bench  # noqa: E402

from cass_dist.configs.finetune import parse_finetune_config  # noqa: E402
from cass_dist.engine.classifier import build_backbone  # noqa: E402
from cass_dist.engine.finetune import finetune  # noqa: E402
from cass_dist.plots import read_records  # noqa: E402


def datasets(image_size: int | None = None) -> dict[str, tuple[list[str], int]]:
    """name -> (cass-shards arguments before --out, image size); ``image_size`` resizes the brain MRI folder."""
    root = Path(os.environ.get("CASS_SHARED_DATA", "../shared/data"))  # a GPU machine gets the data elsewhere
    mri = image_size or 64
    return {
        "pneumoniamnist": (["medmnist", "pneumoniamnist", "--root", str(root / "pneumoniamnist")], 28),
        "breastmnist": (["medmnist", "breastmnist", "--root", str(root / "breastmnist")], 28),
        "brain_mri": (["folder", str(root / "brain_tumor_mri"), "--resize", str(mri), "--mode", "L", "--dedupe"],
                      mri),
    }


DATASETS = list(datasets())


def machine() -> str:
    """Name what a pretraining's seconds were measured on: its GPU, or its CPU model, cores and threads.

    A time ratio means something only between runs on one machine; a results file copied from
    docs/results/ and extended elsewhere mixes machines, so every timed record carries this.
    """
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    cpu = model or platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s)"


class Scale(NamedTuple):
    """The models every contender shares, and the precision they train in."""

    cnn: str
    vit: str
    image_size: int | None  # None: each dataset's own (28 px MedMNIST, 64 px brain MRI)
    patch: int | None  # None: image / 4, 16 tokens
    stem: str  # the default of --stem
    precision: str  # of pretraining and fine-tuning: fp32 on CPU keeps timings comparable; auto = bf16 on a GPU
    datasets: tuple[str, ...]
    pretrain_flags: tuple[str, ...] = ()


SCALES = {
    "small": Scale("resnet18", "vit_tiny_patch16_224", None, None, "small", "fp32", tuple(DATASETS)),
    # issue 14 item 6: the paper's model sizes at 224 px, ImageNet-free, on a GPU (docs/methods.md)
    "paper": Scale("resnet50", "vit_base_patch16_224", 224, 16, "timm", "auto", ("brain_mri",),
                   pretrain_flags=("--model.channels_last", "true")),  # the demo preset's CPU setting is off
}
FLAGS = {"cass": [], "cass-paper": ["--objective", "paper", "--head", "linear", "--views", "1"],
         "dino-vit": ["--method", "dino", "--dino.backbone", "vit"],
         "dino-cnn": ["--method", "dino", "--dino.backbone", "cnn"]}
QUICK = dict(datasets=["breastmnist"], seeds=[0], steps=6, ft_steps=4, ft_fractions=[0.1], ft_lrs=[1e-3, 3e-3])


def parse_args(argv=None) -> Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=DATASETS, help="default: every dataset of --scale")
    p.add_argument("--scale", choices=list(SCALES), default="small",
                   help="small: resnet18 + vit_tiny in fp32 (a CPU); paper: resnet50 + vit_base_patch16_224 "
                        "at 224 px, timm stem, bf16 where the GPU has it (brain MRI only)")
    p.add_argument("--work", help="one folder per dataset inside; default runs/benchmarks/cass_vs_baselines[-paper]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--contenders", nargs="+", default=list(PRETRAINED), choices=list(PRETRAINED),
                   help="pretrained contenders; supervised (random init) and raw pixels always run")
    p.add_argument("--budgets", nargs="+", default=["steps", "time"], choices=["steps", "time"])
    p.add_argument("--steps", type=int, default=600, help="pretraining steps of the equal-steps budget (batch 64)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--probe-fraction", type=float, default=1.0, help="share of train labels the probes fit on")
    p.add_argument("--ft-fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--ft-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="each seed's val F1 picks one")
    p.add_argument("--ft-steps", type=int, default=0,
                   help="fine-tuning steps; 0 = the fine-tuning defaults (50 epochs, at least 500 steps; best val kept)")
    p.add_argument("--stages", nargs="+", default=["probes", "finetune"], choices=["probes", "finetune", "time"],
                   help="probes: pretrain, then probe; finetune: pretrain, then fine-tune; time: only time each "
                        "contender side by side for --time-steps steps")
    p.add_argument("--time-steps", type=int, default=40,
                   help="steps of each --stages time run: 4 log windows, the first (start-up) dropped")
    p.add_argument("--stem", choices=["small", "timm"],
                   help="every contender's CNN stem: small (stride-1 3x3, no max-pool; the default at <= 64 px and "
                        "MedMNIST v2's ResNet-18) or timm's (7x7 stride 2 + max-pool; cheaper on a CPU); "
                        "default: small at --scale small, timm at --scale paper")
    p.add_argument("--quick", action="store_true", help=f"tiny scale, for the plumbing: {QUICK}")
    p.add_argument("--table", action="store_true", help="only print the tables of the results so far")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        if args.scale != "small":
            args.datasets = list(scale.datasets)
    if args.datasets is None:
        args.datasets = list(scale.datasets)
    if not set(args.datasets) <= set(scale.datasets):
        p.error(f"--datasets: --scale {args.scale} runs on {', '.join(scale.datasets)}, not {' '.join(args.datasets)}")
    if args.time_steps < 4:
        p.error(f"--time-steps must be at least 4 (4 log windows of one step or more), not {args.time_steps}")
    args.stem = args.stem or scale.stem
    if args.work is None:
        args.work = "runs/benchmarks/cass_vs_baselines" + ("" if args.scale == "small" else f"-{args.scale}")
        args.work += "-quick" if args.quick else ""
    return args


class Study(Bench):
    """One dataset: pretraining runs, probes and fine-tunes of every contender, in one results store."""

    def __init__(self, args: Namespace, dataset: str):
        self.scale = SCALES[args.scale]
        self.source, image_size = datasets(self.scale.image_size)[dataset]
        super().__init__(Namespace(dataset=dataset, root=None, work=str(Path(args.work) / dataset),
                                   image_size=image_size, patch=self.scale.patch or image_size // 4,
                                   probe_fraction=args.probe_fraction, small_stem=args.stem == "small"))
        self.opts = args
        self.cnn, self.vit = self.scale.cnn, self.scale.vit  # the probes' random-init backbones too

    def model_flags(self, prefix: str) -> list[str]:
        """The scale's models and precision, as flags of ``launch/pretrain.py`` or ``launch/finetune.py``."""
        return [f"--{prefix}cnn", self.cnn, f"--{prefix}vit", self.vit,
                "--precision", self.scale.precision, *self.stem_flags()]

    def make_shards(self) -> None:
        from cass_dist.data.__main__ import main as cass_shards

        with self.locked():
            if not (self.shards / "manifest.json").is_file():
                if cass_shards([*self.source, "--out", str(self.shards)]):
                    raise SystemExit(f"cass-shards failed for {self.args.dataset}")
        self.train_count = self.loader("train").num_samples

    # ------------------------------------------------------------------ pretraining
    def steps_for(self, contender: str, budget: str, seed: int) -> int:
        """Return the pretraining steps of ``contender`` at ``budget`` (equal time: from measured s / step).

        Equal time takes, in order: both methods timed side by side on this machine (``--stages time``),
        else the equal-steps runs when one machine ran both, else it times both here now.
        """
        if budget == "steps" or contender == "cass":
            return self.opts.steps
        cass, other = (self.results.get(self.timing_key(c, seed)) for c in ("cass", contender))
        if not (cass and other):  # one process timing both in turn beats two runs made under different loads
            for measured in ("cass", contender):
                self.pretrain(measured, "steps", seed)  # the equal-steps runs measure each method's s / step
            cass, other = (self.results[f"pretrain/steps/{c}/seed{seed}"] for c in ("cass", contender))
        if not same_machine(cass, other):  # seconds of two machines have no ratio: time both here, side by side
            print(f"pretrain/steps/cass/seed{seed} was timed on {machine_of(cass)} and "
                  f"pretrain/steps/{contender}/seed{seed} on {machine_of(other)}: the equal wall-clock budget "
                  f"of {contender} uses both timed side by side on {machine()} (--stages time)", flush=True)
            cass, other = (self.timing(c, seed) for c in ("cass", contender))
        return equal_time_steps(self.opts.steps, cass["seconds_per_step"], other["seconds_per_step"])

    @staticmethod
    def timing_key(contender: str, seed: int) -> str:
        return f"time/{machine().replace('/', '-')}/{contender}/seed{seed}"

    def timing(self, contender: str, seed: int) -> dict:
        """Record (time if not recorded) ``--time-steps`` pretraining steps of ``contender`` on this machine."""
        here = machine()
        key = self.timing_key(contender, seed)
        if self.done(key):
            return self.results[key]
        steps, window = self.opts.time_steps, self.opts.time_steps // 4
        out = self.work / "time" / f"{contender}-seed{seed}"
        shutil.rmtree(out, ignore_errors=True)  # a resumed run would time its start-up twice
        self.pretrain_to_the_end([*self.pretrain_argv(contender, steps, seed, out), "--log-every", str(window)])
        windows = [self.opts.batch_size / r["images_per_sec"] for r in read_records(out / "metrics.jsonl")
                   if "images_per_sec" in r][1:]
        seconds_per_step = statistics.median(windows)
        shutil.rmtree(out, ignore_errors=True)  # only the seconds are kept
        self.record(key, {"steps": steps, "machine": here, "windows": len(windows),
                          "seconds_per_step": seconds_per_step,
                          "seconds_per_epoch": self.train_count * seconds_per_step / self.opts.batch_size})
        return self.results[key]

    def pretrain_argv(self, contender: str, steps: int, seed: int, out: Path) -> list[str]:
        a = self.args
        return ["--preset", "demo", "--data", str(self.shards), "--image-size", str(a.image_size),
                "--model.vit_patch_size", str(a.patch), "--max-steps", str(steps), "--batch-size",
                str(self.opts.batch_size), "--save-every", "0", "--knn-every", "0", "--seed", str(seed),
                "--output-dir", str(out), "--resume", "auto", *self.model_flags(""), *self.scale.pretrain_flags,
                *FLAGS[contender]]

    def pretrain(self, contender: str, budget: str, seed: int) -> Path:
        """Record the pretraining (run if not recorded; runs of equal step counts are shared); return its run dir.

        A recorded run's dir may be gone (a results file copied from docs/results/): ``pretrained`` checks.
        """
        key = f"pretrain/{budget}/{contender}/seed{seed}"
        steps = self.results[key]["steps"] if self.done(key) else self.steps_for(contender, budget, seed)
        if budget == "steps" and steps != self.opts.steps:  # its probes and fine-tunes would pass for --steps'
            raise SystemExit(f"{key} in {self.results_path} ran {steps} steps, not --steps {self.opts.steps}: "
                             f"pass --steps {steps} to add to that study, or another --work for a new one")
        out = self.work / "pretrain" / f"{contender}-seed{seed}-{steps}steps"
        if self.done(key):
            return out
        if not ((out / "summary.json").is_file() and (out / "export" / "model.json").is_file()):
            self.pretrain_to_the_end(self.pretrain_argv(contender, steps, seed, out))  # resumes if interrupted
            # the study uses the export; the resumable state (~250 MB a run) is dead once the run is complete
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        summary = json.loads((out / "summary.json").read_text())
        records = read_records(out / "metrics.jsonl")
        self.record(key, {"steps": steps, "machine": machine(),
                          "seconds_per_step": self.opts.batch_size / summary["images_per_sec"],
                          "seconds_per_epoch": self.train_count / summary["images_per_sec"],
                          "final_loss": summary["final_loss"],
                          "collapse_warnings": sum("collapse_warning" in r for r in records)})
        return out

    def pretrained(self, contender: str, budget: str, seed: int) -> Path:
        """Return the run dir whose export probes and fine-tunes start from (pretrained if not recorded)."""
        out = self.pretrain(contender, budget, seed)
        if not (out / "export" / "model.json").is_file():
            raise SystemExit(f"pretrain/{budget}/{contender}/seed{seed} is recorded in {self.results_path}, but "
                             f"its export {out / 'export'} is gone: restore that run dir, or delete the key (and "
                             "the probes and fine-tunes of that contender, budget and seed) from results.json to "
                             "pretrain it again")
        return out

    # ------------------------------------------------------------------ evaluation
    def probes(self, contender: str, budget: str, seed: int) -> None:
        key = f"probe/{budget_of(contender, budget)}/{contender}/seed{seed}"
        if self.done(key):
            return
        init = "random" if contender == "supervised" else str(self.pretrained(contender, budget, seed))
        result = {}
        for branch in CONTENDERS[contender]:
            torch.manual_seed(seed)  # random init: each seed its own weights
            backbone, _ = build_backbone(self.model_section(init), branch, self.args.image_size)
            result[branch] = self.probe(backbone)
        self.record(key, result)

    def finetune_run(self, contender: str, budget: str, branch: str, fraction: float, seed: int, lr: float) -> None:
        key = f"finetune/{budget_of(contender, budget)}/{contender}/{branch}/f{fraction:g}/seed{seed}/lr{lr:g}"
        if self.done(key):
            return
        init = "random" if contender == "supervised" else str(self.pretrained(contender, budget, seed))
        labelled = self.loader("train", fraction).num_samples
        out = self.work / "finetune" / key.replace("/", "-")
        started = time.perf_counter()
        result = finetune(parse_finetune_config(self.finetune_argv(init, branch, fraction, labelled, seed, lr, out)))
        self.record(key, {split: {m: result[split][m] for m in METRICS} for split in ("val", "test")}
                    | {"best_step": result["best_step"], "steps": result["steps"], "labelled": labelled,
                       "seconds": time.perf_counter() - started})
        for dead in ("checkpoints", "best"):  # weights, dead once recorded: 1,134 runs would fill ~50 GB
            shutil.rmtree(out / dead, ignore_errors=True)

    def finetune_argv(self, init: str, branch: str, fraction: float, labelled: int, seed: int, lr: float,
                      out: Path) -> list[str]:
        a, o = self.args, self.opts
        argv = ["--data", str(self.shards), "--init", init, "--branch", branch,
                "--model.vit_kwargs", json.dumps({"img_size": a.image_size, "patch_size": a.patch}),
                "--label-fraction", str(fraction), "--data.fraction_seed", str(seed),  # each seed its own draw
                "--image-size", str(a.image_size),
                "--batch-size", str(min(32, labelled)), "--lr", f"{lr:.10f}",
                "--seed", str(seed), "--output-dir", str(out), "--resume", "auto", *self.model_flags("model.")]
        if o.ft_steps:
            argv += ["--max-steps", str(o.ft_steps), "--eval-every", str(max(1, o.ft_steps // 10)), "--patience", "5"]
        return argv

    def run(self) -> None:
        self.make_shards()
        o = self.opts
        if "probes" in o.stages:
            self.raw_pixels()
        for seed in o.seeds:
            if "time" in o.stages:  # CASS first: every ratio is to its seconds
                for contender in dict.fromkeys(["cass", *o.contenders]):
                    self.timing(contender, seed)
            if not {"probes", "finetune"} & set(o.stages):
                continue
            for budget in o.budgets:
                for contender in o.contenders:
                    self.pretrain(contender, budget, seed)
                    if "probes" in o.stages:
                        self.probes(contender, budget, seed)
            if "probes" in o.stages:
                self.probes("supervised", "-", seed)
            if "finetune" not in o.stages:
                continue
            for fraction in o.ft_fractions:
                for budget, contender in [("-", "supervised")] + [(b, c) for b in o.budgets for c in o.contenders]:
                    for branch in CONTENDERS[contender]:
                        for lr in o.ft_lrs:
                            self.finetune_run(contender, budget, branch, fraction, seed, lr)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for dataset in args.datasets:
        study = Study(args, dataset)
        if not args.table:
            study.run()
        text = all_tables(study.results, dataset=dataset, seeds=args.seeds, budgets=args.budgets,
                          contenders=args.contenders, fractions=args.ft_fractions, lrs=args.ft_lrs)
        print(text)
        if not args.table:  # --table only prints: it may read a committed results file (docs/results/)
            (study.work / "tables.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

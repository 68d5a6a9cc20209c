"""The pretraining loop, readable top to bottom (in the spirit of DINO's main_dino.py), for every method.

    config -> Run (Accelerator, run dir, trackers, signals) -> the method (CASS or DINO, see
    cass_dist/methods) + AdamW with its groups -> resume -> for each step: a window of grad_accum_steps
    micro-batches, lr from warmup + cosine by global step, backward, clip, step, the method's
    after-step (DINO's EMA teacher) -> log / kNN / checkpoint -> final checkpoint + export.

The data loader splits the shards by rank itself, so it is never passed to ``accelerator.prepare``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from cass_dist.configs.pretrain import OptimSection, PretrainConfig
from cass_dist.data import build_loader, data_position, load_manifest
from cass_dist.data.augment import manifest_transform
from cass_dist.data.health import SkipTracker, check_digests
from cass_dist.data.manifest import Manifest, write_json_atomic
from cass_dist.engine.checkpoint import find_latest
from cass_dist.engine.fingerprint import pretrain_fingerprint
from cass_dist.engine.probe import extract_features, knn_predict
from cass_dist.engine.run import Run
from cass_dist.engine.step import count_steps, lr_factor, optimizer_step, set_lrs
from cass_dist.errors import CassError
from cass_dist.methods import Method, build_method
from cass_dist.models import export_backbones
from cass_dist.models.backbones import pooled_features
from cass_dist.monitor import CollapseMonitor, embedding_stats
from cass_dist.utils.deepspeed import check_launch as check_deepspeed_launch
from cass_dist.utils.distributed import sync_batchnorm

LoaderFactory = Callable[[PretrainConfig, object, int, int], Iterable[dict]]


class NonFiniteLossError(CassError, RuntimeError):
    """The loss was NaN/inf for ``run.max_nonfinite_steps`` steps in a row."""


@dataclass
class PretrainSummary:
    steps: int
    images_per_sec: float
    final_loss: float
    embed_std_cnn: float
    embed_std_vit: float
    nonfinite_steps: int
    skipped_samples: int
    checkpoint: str
    export_dir: str  # empty when the run stopped early (signal): resume it to finish and export
    stopped_by: str  # "" when the run completed, else the signal that stopped it
    method: str = "cass"  # the pretraining method (cfg.method)
    overflow_steps: int = 0  # fp16 only: steps the loss scaler skipped (a few while it finds its scale are normal)

    def describe(self) -> str:
        stds = ", ".join(f"{b} {v:.4f}" for b, v in (("cnn", self.embed_std_cnn), ("vit", self.embed_std_vit))
                         if not math.isnan(v))  # a one-backbone method (DINO) has one
        lines = [f"{self.method}: steps {self.steps}, {self.images_per_sec:.1f} images/s, final loss {self.final_loss:.4f}",
                 f"embedding std {stds or 'not measured'}",
                 f"checkpoint: {self.checkpoint}"]
        if self.nonfinite_steps or self.overflow_steps:
            lines.append(f"updates skipped: {self.nonfinite_steps} non-finite loss, {self.overflow_steps} fp16 overflow")
        lines.append(f"export: {self.export_dir}" if self.export_dir else
                     f"stopped by {self.stopped_by}: resume with --resume auto to finish")
        return "\n".join(lines)


def build_optimizer(cfg: OptimSection, model: Method, *, world_size: int = 1) -> torch.optim.Optimizer:
    """Return Adam(W) over the method's parameter groups (each group keeps its ``name``), hooks attached."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = cls(model.optimizer_groups(cfg, world_size=world_size), betas=tuple(cfg.betas), eps=cfg.eps)
    model.attach_optimizer(optimizer)
    return optimizer


def build_train_loader(cfg: PretrainConfig, accelerator, epoch: int, start_batch: int | dict) -> Iterable[dict]:
    """Return this rank's training loader from ``epoch`` on, resumed at ``start_batch`` (a count or a position)."""
    d = cfg.data
    return build_loader(d.shards, d.train_split, batch_size=d.batch_size, train=True,
                        rank=accelerator.process_index, world_size=accelerator.num_processes,
                        num_workers=d.num_workers, seed=cfg.run.seed, epoch=epoch, image_size=d.image_size,
                        transform=d.transform, start_batch=start_batch, views=d.views, device=accelerator.device,
                        prefetch_factor=d.prefetch_factor, persistent_workers=d.persistent_workers,
                        shuffle_buffer=d.shuffle_buffer, decode=d.decode)


def pretrain(cfg: PretrainConfig, *, make_loader: LoaderFactory = build_train_loader) -> PretrainSummary:
    """Run CASS pretraining as configured; return the summary (also saved as ``summary.json``).

    Raises NonFiniteLossError after too many non-finite steps in a row (the last checkpoint stays),
    CheckpointError for a bad ``--resume``, ManifestError for a bad shard directory.
    """
    manifest = load_manifest(cfg.data.shards)  # a bad shard dir fails before the run dir is created
    check_deepspeed_launch(batch_size=cfg.data.batch_size, grad_accum_steps=cfg.run.grad_accum_steps,
                           clip_grad=cfg.run.clip_grad)
    run = Run(cfg.run, config=cfg)
    try:
        return _train(cfg, run, manifest, make_loader)
    finally:
        run.finish()


def _train(cfg: PretrainConfig, run: Run, manifest: Manifest, make_loader: LoaderFactory) -> PretrainSummary:
    acc, accum = run.accelerator, cfg.run.grad_accum_steps
    model = build_method(cfg)
    # the whole module: CNN, projector heads, predictors (VICReg's and BYOL's recipe); before DDP wraps it
    model, sync_bn_note = sync_batchnorm(model, cfg.model.sync_bn, num_processes=acc.num_processes, device=acc.device)
    run.print(sync_bn_note)
    if cfg.model.channels_last and acc.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed broadcasts every parameter as a flat byte view at prepare, which a channels_last conv
        # weight cannot give ("stride(-1) must be 1"): keep the weights contiguous (inputs stay channels_last)
        model.to(memory_format=torch.contiguous_format)
        run.print("channels_last: the CNN weights stay contiguous under DeepSpeed (its broadcast needs it)")
    if accum > 1 and getattr(getattr(model, "objective", None), "uses_batch_statistics", False):
        images = cfg.data.batch_size * (acc.num_processes if cfg.objective.gather else 1)
        run.print(f"WARNING: objective {cfg.objective.name} computes its batch statistics per micro-batch "
                  f"({images} images), not over the {accum} micro-batches of a step: run.grad_accum_steps "
                  f"changes what it optimises (docs/distributed.md)")
    optimizer = build_optimizer(cfg.optim, model, world_size=acc.num_processes)
    method = model  # the unwrapped module, for the calls DDP does not forward
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before resume: load_state overwrites "lr"
    branch_of_group = [g["name"] for g in optimizer.param_groups]
    model, optimizer = acc.prepare(model, optimizer)
    state = run.resume(pretrain_fingerprint(cfg, manifest, acc.num_processes))  # refuses a changed run
    if cfg.data.verify_shards:
        check_digests(cfg.data.shards, [cfg.data.train_split, cfg.data.val_split], accelerator=acc)

    loader = make_loader(cfg, acc, state.epoch, 0)
    batches_per_epoch = len(loader)
    if state.data_position or state.batch_in_epoch:  # mid-epoch: go on from the saved position
        loader = make_loader(cfg, acc, state.epoch, state.data_position or state.batch_in_epoch)
    total_steps, steps_per_epoch = count_steps(batches_per_epoch, grad_accum_steps=accum, max_steps=cfg.run.max_steps,
                                               epochs=cfg.run.epochs, split=cfg.data.train_split,
                                               min_steps=cfg.run.min_steps)
    run.print(f"{method.summary_line()}: {total_steps} steps of {cfg.data.batch_size * accum * acc.num_processes}"
              f" images ({steps_per_epoch} steps per epoch)")

    finished = run.dir / "summary.json"
    if state.global_step >= total_steps and finished.is_file():  # e.g. the demo launched a second time
        summary = PretrainSummary(**json.loads(finished.read_text()))
        run.print(f"{run.dir} already completed {state.global_step} steps (raise --max-steps to go on):\n"
                  + summary.describe())
        return summary

    # the method's own augmentation (DINO's multi-crop), else the data section's (CASS: data.views views)
    transform = method.view_transform(manifest) or manifest_transform(
        cfg.data.transform, manifest, image_size=cfg.data.image_size, views=cfg.data.views)

    def forward(batch: dict) -> dict:
        # uint8 off the loader, augmented on the device. CASS: the CNN gets views[0], the ViT views[-1]
        # (data.views=2: two augmentations); DINO: 2 global crops, then the local ones
        views = transform(batch["image"].to(acc.device, non_blocking=True), seed=batch["seed"])
        return model(views, global_step=state.global_step, total_steps=total_steps)

    monitor = CollapseMonitor(cfg.monitor.collapse_std_fraction, cfg.monitor.collapse_min_eff_rank)
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not run.is_main, desc="pretrain")
    window_loss = torch.zeros((), device=acc.device)
    stats: dict[str, dict] = {}
    images_seen, data_time, bad_in_a_row, last_loss = 0, 0.0, 0, float("nan")
    skips = SkipTracker(manifest, cfg.data.shards, cfg.data.train_split, cfg.data.max_skipped_fraction,
                        print_fn=run.print)
    knn_loaders: dict = {}  # built once: their workers serve every kNN evaluation
    train_start = log_start = time.perf_counter()
    log_images, log_steps = 0, 0
    checkpoint, saved_step, stopping = "", -1, False
    paused = log_paused = 0.0
    while state.global_step < total_steps and not stopping:
        # One loader for the whole run: each iter() is the next epoch, served by the same workers.
        epoch_batches, batches, consumed = len(loader), iter(loader), 0
        while state.global_step < total_steps:
            # ---- one optimizer step: a window of `accum` micro-batches
            # Reseed from (seed, step, rank): augmentations and dropout then depend on nothing that came
            # before (e.g. the RNG draw a DataLoader makes when it starts), so a resumed run is exact.
            set_seed(cfg.run.seed * 1_000_003 + state.global_step * 1_009 + acc.process_index)
            t0 = time.perf_counter()
            window = list(itertools.islice(batches, accum))
            data_time += time.perf_counter() - t0
            if len(window) < accum:  # the loader ended before len() said: treat it as the epoch's end
                state.epoch, state.batch_in_epoch, state.data_position = state.epoch + 1, 0, {}
                break
            set_lrs(optimizer, base_lrs,
                    lr_factor(state.global_step, total_steps, cfg.run.warmup_steps, cfg.run.min_lr_ratio))
            # all ranks agree on `finite` and `stop_agreed` in the step's one collective (engine/step.py)
            finite, loss_sum, out, stop_agreed, overflow = optimizer_step(
                acc, model, optimizer, window, forward, clip_grad=cfg.run.clip_grad, stop_requested=run.stop_requested)
            state.overflow_steps += overflow
            if finite:  # a skipped step changed no weight: nothing for the method to follow
                method.after_step(state.global_step, total_steps)  # DINO: the EMA teacher (by global step)
            window_loss += loss_sum / accum
            window_images = sum(len(batch["image"]) for batch in window) * acc.num_processes
            images_seen += window_images
            log_images += window_images
            state.global_step += 1
            state.batch_in_epoch += accum
            consumed += accum
            state.data_position = data_position(loader, consumed)  # in global samples: any layout resumes it
            if consumed + accum > epoch_batches:
                state.epoch, state.batch_in_epoch, state.data_position = state.epoch + 1, 0, {}
            progress.update(1)

            # ---- robustness: skip non-finite steps, give up after too many in a row
            if not finite:
                state.nonfinite_steps += 1
                bad_in_a_row += 1
                run.print(f"step {state.global_step}: non-finite loss, update skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= cfg.run.max_nonfinite_steps:
                    last_good = find_latest(run.checkpoints_dir)
                    raise NonFiniteLossError(
                        f"the loss was non-finite for {bad_in_a_row} steps in a row (step {state.global_step}); "
                        f"lower optim.lr_cnn/lr_vit, set run.clip_grad or run.precision fp32. Last good checkpoint: "
                        f"{last_good or 'none yet'}")
            else:
                bad_in_a_row = 0
                log_steps += 1

            # ---- logging (every rank takes part in the reductions)
            if state.global_step % cfg.run.log_every == 0 or state.global_step == total_steps:
                elapsed = time.perf_counter() - log_start - (paused - log_paused)
                last_loss = float(acc.reduce(window_loss, "mean")) / max(1, log_steps) if log_steps else float("nan")
                metrics = {"loss": last_loss, "images_per_sec": log_images / elapsed,
                           "data_wait_frac": data_time / elapsed, "epoch": state.epoch,
                           "nonfinite_steps": state.nonfinite_steps, "overflow_steps": state.overflow_steps,
                           "skipped_samples": skips.check(loader, acc, state.epoch)}
                metrics.update({k: float(v) for k, v in out.items()
                                if k != "loss" and not k.startswith("z_") and (isinstance(v, float) or torch.is_tensor(v) and v.numel() == 1)})
                for group, name in zip(optimizer.param_groups, branch_of_group):
                    metrics.setdefault(f"lr_{name}", group["lr"])
                if torch.cuda.is_available():
                    metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                for branch in (key[2:] for key in out if key.startswith("z_")):  # each branch the method trains
                    stats[branch] = embedding_stats(out[f"z_{branch}"])
                    metrics.update({f"embed_{k}_{branch}": v for k, v in stats[branch].items() if k != "dim"})
                warning = monitor.check(stats)
                if warning:
                    run.print(f"WARNING step {state.global_step}: {warning}")
                    metrics["collapse_warning"] = 1
                run.log(state.global_step, metrics)
                progress.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                window_loss.zero_()
                log_start, log_images, log_steps, data_time = time.perf_counter(), 0, 0, 0.0
                log_paused = paused

            t0 = time.perf_counter()  # evaluation and checkpoints do not count against images/s
            if cfg.monitor.knn_every and state.global_step % cfg.monitor.knn_every == 0:
                run.log(state.global_step, knn_accuracy(cfg, acc, method.backbones(), manifest,
                                                        loaders=knn_loaders))
            if cfg.run.save_every and state.global_step % cfg.run.save_every == 0:
                checkpoint, saved_step = str(run.save(state)), state.global_step
            paused += time.perf_counter() - t0
            stopping = run.should_stop(stop_agreed)  # agreed by all ranks; run.stop_signal alone is per-process
            if stopping:
                run.print(f"stop requested ({run.stop_signal}) at step {state.global_step}: checkpointing")
                break
            if state.batch_in_epoch == 0:
                break  # epoch done: the loader's next iter() is the next, freshly shuffled epoch

    # ---- the end: a final checkpoint (unless this very step was just saved), exports, summary
    progress.close()
    if saved_step != state.global_step:
        checkpoint = str(run.save(state))
    export_dir = ""
    if not stopping:
        if run.is_main:
            export_backbones(method, run.export_dir,
                             extra={"config": asdict(cfg), "manifest_digest": manifest.digest(),
                                    "steps": state.global_step})
            export_dir = str(run.export_dir)
        acc.wait_for_everyone()
    train_time = time.perf_counter() - train_start - paused
    summary = PretrainSummary(
        steps=state.global_step, images_per_sec=images_seen / max(train_time, 1e-9), final_loss=last_loss,
        embed_std_cnn=stats.get("cnn", {}).get("std", float("nan")),
        embed_std_vit=stats.get("vit", {}).get("std", float("nan")),
        nonfinite_steps=state.nonfinite_steps, overflow_steps=state.overflow_steps, checkpoint=checkpoint,
        skipped_samples=skips.check(loader, acc, state.epoch),
        export_dir=export_dir, stopped_by=(run.stop_signal or "peer") if stopping else "", method=cfg.method)
    if run.is_main:
        write_json_atomic(run.dir / "summary.json", asdict(summary))
        run.print("summary:\n" + summary.describe() + (f"\n{skips.describe()}" if skips.total else ""))
    return summary


class _AllFeatures(torch.nn.Module):
    """Pooled features of every backbone side by side, so one pass over the data serves every kNN probe."""

    def __init__(self, backbones: dict[str, torch.nn.Module]):
        super().__init__()
        self.backbones = torch.nn.ModuleDict(backbones)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([pooled_features(b, images) for b in self.backbones.values()], dim=1)


@torch.no_grad()
def knn_accuracy(cfg: PretrainConfig, accelerator, backbones: dict[str, torch.nn.Module], manifest: Manifest,
                 loaders: dict | None = None) -> dict[str, float]:
    """Return ``{"knn_acc_<branch>"}`` per backbone: weighted kNN on the val split over a train-split bank.

    Returns {} when the shard set has no val split or only multi-label targets. Call on every rank.
    ``loaders`` (a dict kept by the caller) keeps the evaluation loaders, and their workers, for the next call.
    """
    d = cfg.data
    if d.val_split not in manifest.splits or manifest.task == "multi-label":
        return {}
    loaders = {} if loaders is None else loaders

    def loader(split: str):
        if split not in loaders:
            loaders[split] = build_loader(
                d.shards, split, batch_size=d.batch_size, train=False, rank=accelerator.process_index,
                world_size=accelerator.num_processes, num_workers=d.num_workers, image_size=d.image_size,
                transform="eval", device=accelerator.device, prefetch_factor=d.prefetch_factor,
                persistent_workers=d.persistent_workers, decode=d.decode)
        return loaders[split]

    bank_batches = math.ceil(cfg.monitor.knn_max_train / (d.batch_size * accelerator.num_processes))
    every = _AllFeatures(backbones)
    transform = manifest_transform("eval", manifest, image_size=d.image_size)
    bank, bank_labels, _ = extract_features(every, itertools.islice(loader(d.train_split), bank_batches),
                                            accelerator=accelerator, transform=transform)
    query, query_labels, _ = extract_features(every, loader(d.val_split), accelerator=accelerator, transform=transform)
    out, start = {}, 0
    for branch, backbone in backbones.items():
        cols, start = slice(start, start + backbone.num_features), start + backbone.num_features
        probs = knn_predict(bank[:, cols], bank_labels, query[:, cols], num_classes=manifest.num_classes,
                            k=cfg.monitor.knn_k)
        out[f"knn_acc_{branch}"] = float((probs.argmax(1) == query_labels).float().mean())
    return out

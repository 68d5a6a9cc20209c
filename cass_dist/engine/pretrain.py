"""CASS pretraining loop, readable top to bottom (in the spirit of DINO's main_dino.py).

    config -> Run (Accelerator, run dir, trackers, signals) -> CASSPretrainer + AdamW with per-branch
    groups -> resume -> for each step: a window of grad_accum_steps micro-batches, lr from warmup +
    cosine by global step, backward, clip, step -> log / kNN / checkpoint -> final checkpoint + export.

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
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from cass_dist.configs.pretrain import OptimSection, PretrainConfig
from cass_dist.data import build_loader, load_manifest
from cass_dist.data.manifest import Manifest, write_json_atomic
from cass_dist.engine.checkpoint import find_latest
from cass_dist.engine.probe import extract_features, knn_predict
from cass_dist.engine.run import Run
from cass_dist.engine.step import count_steps, lr_factor, optimizer_step, set_lrs
from cass_dist.errors import CassError
from cass_dist.losses.cass import build_objective
from cass_dist.models import CASS, CASSPretrainer, export_backbones
from cass_dist.monitor import CollapseMonitor, embedding_stats
from cass_dist.utils.deepspeed import check_launch as check_deepspeed_launch

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

    def describe(self) -> str:
        lines = [f"steps {self.steps}, {self.images_per_sec:.1f} images/s, final loss {self.final_loss:.4f}",
                 f"embedding std cnn {self.embed_std_cnn:.4f}, vit {self.embed_std_vit:.4f}",
                 f"checkpoint: {self.checkpoint}"]
        lines.append(f"export: {self.export_dir}" if self.export_dir else
                     f"stopped by {self.stopped_by}: resume with --resume auto to finish")
        return "\n".join(lines)


def build_pretrainer(cfg: PretrainConfig) -> CASSPretrainer:
    """Return the CASS pair + objective as one module (grad checkpointing, channels_last, compile applied)."""
    m = cfg.model
    cass = CASS(m.cnn, m.vit, embed_dim=m.embed_dim, head=m.head, proj_hidden_dim=m.proj_hidden_dim,
                img_size=cfg.data.image_size, vit_patch_size=m.vit_patch_size, small_stem=m.small_stem,
                drop_path_rate=m.drop_path_rate,
                pretrained=m.pretrained, cnn_pretrained_file=m.pretrained_cnn_file or None,
                vit_pretrained_file=m.pretrained_vit_file or None, cache_dir=m.cache_dir or None)
    if m.grad_checkpointing:
        cass.set_grad_checkpointing(True)
    if m.channels_last:
        cass.cnn.to(memory_format=torch.channels_last)
    if m.compile:  # in place, so state_dict keys (checkpoints, exports) stay unprefixed
        cass.cnn.compile()
        cass.vit.compile()
    return CASSPretrainer(cass, build_objective(cfg.objective.name, embed_dim=m.embed_dim, **cfg.objective.kwargs))


def build_optimizer(cfg: OptimSection, model: CASSPretrainer) -> torch.optim.Optimizer:
    """Return Adam(W) over the model's per-branch parameter groups (each group keeps its ``name``)."""
    groups = model.param_groups(lr_cnn=cfg.lr_cnn, lr_vit=cfg.lr_vit, weight_decay_cnn=cfg.weight_decay_cnn,
                                weight_decay_vit=cfg.weight_decay_vit)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, betas=tuple(cfg.betas), eps=cfg.eps)


def build_train_loader(cfg: PretrainConfig, accelerator, epoch: int, start_batch: int) -> Iterable[dict]:
    """Return this rank's training loader for ``epoch``, starting at micro-batch ``start_batch``."""
    d = cfg.data
    return build_loader(d.shards, d.train_split, batch_size=d.batch_size, train=True,
                        rank=accelerator.process_index, world_size=accelerator.num_processes,
                        num_workers=d.num_workers, seed=cfg.run.seed, epoch=epoch, image_size=d.image_size,
                        transform=d.transform, start_batch=start_batch, views=d.views)


def pretrain(cfg: PretrainConfig, *, make_loader: LoaderFactory = build_train_loader) -> PretrainSummary:
    """Run CASS pretraining as configured; return the summary (also saved as ``summary.json``).

    Raises NonFiniteLossError after too many non-finite steps in a row (the last checkpoint stays),
    CheckpointError for a bad ``--resume``, ManifestError for a bad shard directory.
    """
    manifest = load_manifest(cfg.data.shards)  # a bad shard dir fails before the run dir is created
    check_deepspeed_launch(batch_size=cfg.data.batch_size, grad_accum_steps=cfg.run.grad_accum_steps)
    run = Run(cfg.run, config=cfg)
    try:
        return _train(cfg, run, manifest, make_loader)
    finally:
        run.finish()


def _train(cfg: PretrainConfig, run: Run, manifest: Manifest, make_loader: LoaderFactory) -> PretrainSummary:
    acc, accum = run.accelerator, cfg.run.grad_accum_steps
    model = build_pretrainer(cfg)
    if cfg.model.sync_bn and acc.num_processes > 1 and acc.device.type == "cuda":
        model.model.cnn = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.model.cnn)
    optimizer = build_optimizer(cfg.optim, model)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before resume: load_state overwrites "lr"
    branch_of_group = [g["name"] for g in optimizer.param_groups]
    model, optimizer = acc.prepare(model, optimizer)
    state = run.resume()

    loader = make_loader(cfg, acc, state.epoch, 0)
    batches_per_epoch = len(loader)
    total_steps, steps_per_epoch = count_steps(batches_per_epoch, grad_accum_steps=accum, max_steps=cfg.run.max_steps,
                                               epochs=cfg.run.epochs, split=cfg.data.train_split)
    run.print(f"{type(acc.unwrap_model(model).model.cnn).__name__} + {type(acc.unwrap_model(model).model.vit).__name__},"
              f" objective {cfg.objective.name}: {total_steps} steps of {cfg.data.batch_size * accum * acc.num_processes}"
              f" images ({steps_per_epoch} steps per epoch)")

    finished = run.dir / "summary.json"
    if state.global_step >= total_steps and finished.is_file():  # e.g. the demo launched a second time
        summary = PretrainSummary(**json.loads(finished.read_text()))
        run.print(f"{run.dir} already completed {state.global_step} steps (raise --max-steps to go on):\n"
                  + summary.describe())
        return summary

    def forward(batch: dict) -> dict:
        images = batch["image"].to(acc.device, non_blocking=True)
        # [B, 2, C, H, W] with data.views=2: the CNN gets the first view, the ViT the second
        cnn_images, vit_images = images.unbind(1) if images.ndim == 5 else (images, images)
        if cfg.model.channels_last:
            cnn_images = cnn_images.contiguous(memory_format=torch.channels_last)
        return model(cnn_images, vit_images)

    monitor = CollapseMonitor(cfg.monitor.collapse_std_fraction, cfg.monitor.collapse_min_eff_rank)
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not run.is_main, desc="pretrain")
    window_loss = torch.zeros((), device=acc.device)
    stats = {"cnn": {}, "vit": {}}
    images_seen, data_time, bad_in_a_row, last_loss, skipped_before = 0, 0.0, 0, float("nan"), 0
    train_start = log_start = time.perf_counter()
    log_images, log_steps = 0, 0
    checkpoint, saved_step, stopping = "", -1, False
    paused = log_paused = 0.0
    while state.global_step < total_steps and not stopping:
        if state.batch_in_epoch or loader is None:
            loader = make_loader(cfg, acc, state.epoch, state.batch_in_epoch)
        batches = iter(loader)
        while state.global_step < total_steps:
            # ---- one optimizer step: a window of `accum` micro-batches
            # Reseed from (seed, step, rank): augmentations and dropout then depend on nothing that came
            # before (e.g. the RNG draw a DataLoader makes when it starts), so a resumed run is exact.
            set_seed(cfg.run.seed * 1_000_003 + state.global_step * 1_009 + acc.process_index)
            t0 = time.perf_counter()
            window = list(itertools.islice(batches, accum))
            data_time += time.perf_counter() - t0
            if len(window) < accum:  # the loader ended before len() said: treat it as the epoch's end
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                break
            set_lrs(optimizer, base_lrs,
                    lr_factor(state.global_step, total_steps, cfg.run.warmup_steps, cfg.run.min_lr_ratio))
            finite, loss_sum, out = optimizer_step(acc, model, optimizer, window, forward,
                                                   clip_grad=cfg.run.clip_grad)
            window_loss += loss_sum / accum
            window_images = sum(len(batch["image"]) for batch in window) * acc.num_processes
            images_seen += window_images
            log_images += window_images
            state.global_step += 1
            state.batch_in_epoch += accum
            if state.batch_in_epoch + accum > batches_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
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
                           "nonfinite_steps": state.nonfinite_steps,
                           "skipped_samples": int(acc.reduce(torch.tensor(skipped_before + _skipped(loader),
                                                                          device=acc.device), "sum"))}
                metrics.update({k: float(v) for k, v in out.items()
                                if k not in ("loss", "z_cnn", "z_vit") and torch.is_tensor(v) and v.numel() == 1})
                for group, name in zip(optimizer.param_groups, branch_of_group):
                    metrics.setdefault(f"lr_{name}", group["lr"])
                if torch.cuda.is_available():
                    metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                for branch in ("cnn", "vit"):
                    stats[branch] = embedding_stats(out[f"z_{branch}"])
                    metrics.update({f"embed_{k}_{branch}": v for k, v in stats[branch].items() if k != "dim"})
                warning = monitor.update(stats["cnn"], stats["vit"])
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
                run.log(state.global_step, knn_accuracy(cfg, acc, acc.unwrap_model(model).model, manifest))
            if cfg.run.save_every and state.global_step % cfg.run.save_every == 0:
                checkpoint, saved_step = str(run.save(state)), state.global_step
            paused += time.perf_counter() - t0
            stopping = run.should_stop()  # agreed by all ranks; run.stop_signal alone is per-process
            if stopping:
                run.print(f"stop requested ({run.stop_signal}) at step {state.global_step}: checkpointing")
                break
            if state.batch_in_epoch == 0:
                break  # epoch done: the next epoch gets a freshly shuffled loader
        skipped_before += _skipped(loader)
        loader = None

    # ---- the end: a final checkpoint (unless this very step was just saved), exports, summary
    progress.close()
    if saved_step != state.global_step:
        checkpoint = str(run.save(state))
    export_dir = ""
    if not stopping:
        if run.is_main:
            export_backbones(acc.unwrap_model(model), run.export_dir,
                             extra={"config": asdict(cfg), "manifest_digest": manifest.digest(),
                                    "steps": state.global_step})
            export_dir = str(run.export_dir)
        acc.wait_for_everyone()
    train_time = time.perf_counter() - train_start - paused
    summary = PretrainSummary(
        steps=state.global_step, images_per_sec=images_seen / max(train_time, 1e-9), final_loss=last_loss,
        embed_std_cnn=stats["cnn"].get("std", float("nan")), embed_std_vit=stats["vit"].get("std", float("nan")),
        nonfinite_steps=state.nonfinite_steps, checkpoint=checkpoint,
        skipped_samples=int(acc.reduce(torch.tensor(skipped_before, device=acc.device), "sum")),
        export_dir=export_dir, stopped_by=(run.stop_signal or "peer") if stopping else "")
    if run.is_main:
        write_json_atomic(run.dir / "summary.json", asdict(summary))
        run.print("summary:\n" + summary.describe())
    return summary


def _skipped(loader) -> int:
    """Corrupted samples the loader skipped on this rank (0 for loaders that do not count)."""
    return int(loader.skipped()) if hasattr(loader, "skipped") else 0


class _BothFeatures(torch.nn.Module):
    """Pooled CNN and ViT features side by side, so one pass over the data serves both kNN probes."""

    def __init__(self, cass: CASS):
        super().__init__()
        self.cass = cass

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.cass.features(images), dim=1)


@torch.no_grad()
def knn_accuracy(cfg: PretrainConfig, accelerator, cass: CASS, manifest: Manifest) -> dict[str, float]:
    """Return ``{"knn_acc_cnn", "knn_acc_vit"}``: weighted kNN on the val split over a train-split bank.

    Returns {} when the shard set has no val split or only multi-label targets. Call on every rank.
    """
    d = cfg.data
    if d.val_split not in manifest.splits or manifest.task == "multi-label":
        return {}

    def loader(split: str):
        return build_loader(d.shards, split, batch_size=d.batch_size, train=False, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, num_workers=d.num_workers,
                            image_size=d.image_size, transform="eval")

    bank_batches = math.ceil(cfg.monitor.knn_max_train / (d.batch_size * accelerator.num_processes))
    both = _BothFeatures(cass)
    bank, bank_labels, _ = extract_features(both, itertools.islice(loader(d.train_split), bank_batches),
                                            accelerator=accelerator)
    query, query_labels, _ = extract_features(both, loader(d.val_split), accelerator=accelerator)
    split_at = cass.cnn.num_features
    out = {}
    for branch, cols in (("cnn", slice(0, split_at)), ("vit", slice(split_at, None))):
        probs = knn_predict(bank[:, cols], bank_labels, query[:, cols], num_classes=manifest.num_classes,
                            k=cfg.monitor.knn_k)
        out[f"knn_acc_{branch}"] = float((probs.argmax(1) == query_labels).float().mean())
    return out

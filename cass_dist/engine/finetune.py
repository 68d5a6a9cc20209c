"""Fine-tuning loop: a CASS (or random / ImageNet) backbone + a new head, trained on labels.

    config -> Run (the pretraining's Accelerator, precision, run dir, trackers, signals, checkpoints)
    -> Classifier for the manifest's task -> AdamW (optional layer-wise lr decay), warmup + cosine by
    global step -> validate every epoch (or eval_every steps): early stopping on a chosen metric,
    ``best/`` kept -> ``best/`` evaluated on test -> metrics.json + plots.

A fine-tuning run dir holds, besides the Run's files, ``best/classifier.safetensors`` with
``best/classifier.json`` (task, class names, each branch's timm name and keywords: enough to rebuild
it without the pretraining run), ``metrics.json``, ``curves.png`` and ``confusion_matrix.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import asdict

import torch
from accelerate.utils import DistributedDataParallelKwargs

from cass_dist.configs.finetune import FinetuneConfig
from cass_dist.data import build_loader, data_position, load_manifest
from cass_dist.data.augment import manifest_transform
from cass_dist.data.health import SkipTracker, check_digests
from cass_dist.data.manifest import Manifest, write_json_atomic
from cass_dist.engine.checkpoint import TrainState
from cass_dist.engine.classifier import (
    Classifier,
    branches_of,
    build_classifier,
    dataset_name,
    evaluate_classifier,
    load_classifier,
    save_classifier,
)
from cass_dist.engine.fingerprint import finetune_fingerprint
from cass_dist.engine.inits import (
    ClassifierError,
    InitSource,
    check_init_files,
    read_init,
    resolve_image_size,
)
from cass_dist.engine.run import Run
from cass_dist.engine.step import count_steps, lr_factor, optimizer_step, set_lrs
from cass_dist.errors import CassError
from cass_dist.losses import focal_loss
from cass_dist.metrics import write_metrics
from cass_dist.plots import log_images, plot_confusion_matrix, plot_curves
from cass_dist.utils.deepspeed import check_launch

BEST_DIR = "best"


class NonFiniteLossError(CassError, RuntimeError):
    """The fine-tuning loss was NaN/inf for ``run.max_nonfinite_steps`` steps in a row."""


def build_optimizer(cfg: FinetuneConfig, model: Classifier) -> tuple[torch.optim.Optimizer, list[float]]:
    """Return AdamW over the classifier and each group's base lr (lr x its layer-decay scale).

    With ``optim.layer_decay`` < 1 each backbone's groups come from timm's ``param_groups_layer_decay``
    (its own block structure), so block i of n gets ``lr * layer_decay ** (n - i)``; heads get ``lr``.
    Norms and biases get no weight decay. Each group's ``part`` says ``backbone`` or ``head``.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    o = cfg.optim
    groups = []
    for backbone in model.backbones.values():
        if o.layer_decay < 1:
            groups += param_groups_layer_decay(backbone, weight_decay=o.weight_decay, layer_decay=o.layer_decay)
        else:
            groups += param_groups_weight_decay(backbone, weight_decay=o.weight_decay)
    for group in groups:
        group["part"] = "backbone"
    groups += [g | {"part": "head"} for g in param_groups_weight_decay(model.heads, weight_decay=o.weight_decay)]
    base_lrs = [o.lr * g.get("lr_scale", 1.0) for g in groups]
    for group, lr in zip(groups, base_lrs):
        group["lr"] = lr
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas)), base_lrs


def lr_factors(cfg: FinetuneConfig, step: int, total_steps: int) -> dict[str, float]:
    """Return the lr multiplier of the heads and of the backbones at global ``step``.

    Heads follow warmup + cosine over the whole run. With ``optim.freeze_backbone_steps`` = F the
    backbones get 0 before step F, then their own warmup + cosine over the remaining steps.
    """
    run, frozen = cfg.run, cfg.optim.freeze_backbone_steps
    head = lr_factor(step, total_steps, run.warmup_steps, run.min_lr_ratio)
    if not frozen:
        return {"head": head, "backbone": head}
    backbone = 0.0 if step < frozen else lr_factor(step - frozen, total_steps - frozen, run.warmup_steps,
                                                  run.min_lr_ratio)
    return {"head": head, "backbone": backbone}


class FinetuneLoss:
    """The summed loss of every branch: focal, or cross-entropy / BCE (focal with gamma 0).

    The class weights become one device tensor here, not a host-to-device copy per micro-batch, and
    the target checks (which read values: a host sync) run on the first call only; the data layer
    already checked every label against the manifest when the shards were written.
    """

    def __init__(self, cfg: FinetuneConfig, manifest: Manifest, device: torch.device | str):
        self.task = manifest.task
        self.gamma = cfg.loss.gamma if cfg.loss.name == "focal" else 0.0
        alpha = manifest.class_weights if cfg.loss.class_weights else cfg.loss.alpha
        self.alpha = torch.tensor(alpha, dtype=torch.float32, device=device) if isinstance(alpha, list) else alpha
        self.checked = False

    def __call__(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        check, self.checked = not self.checked, True
        return sum(focal_loss(out, labels, task=self.task, alpha=self.alpha, gamma=self.gamma, check_values=check)
                   for out in logits.values())


def compute_loss(cfg: FinetuneConfig, manifest: Manifest, logits: dict[str, torch.Tensor],
                 labels: torch.Tensor) -> torch.Tensor:
    """Return the summed loss of every branch, with every check (one-off use; the loop uses FinetuneLoss)."""
    return FinetuneLoss(cfg, manifest, labels.device)(logits, labels)


def frozen_at(cfg: FinetuneConfig, step: int) -> bool:
    """Return True while the backbones are frozen: before global step ``optim.freeze_backbone_steps``."""
    return step < cfg.optim.freeze_backbone_steps


def build_train_loader(cfg: FinetuneConfig, accelerator, epoch: int, start_batch: int | dict):
    """Return this rank's training loader (label fraction applied) from ``epoch`` on, resumed at ``start_batch``."""
    d = cfg.data
    return build_loader(d.shards, d.train_split, batch_size=d.batch_size, train=True,
                        rank=accelerator.process_index, world_size=accelerator.num_processes,
                        num_workers=d.num_workers, seed=cfg.run.seed, epoch=epoch, image_size=d.image_size or None,
                        label_fraction=d.label_fraction, fraction_seed=d.fraction_seed, transform=d.train_transform,
                        start_batch=start_batch, device=accelerator.device, prefetch_factor=d.prefetch_factor,
                        persistent_workers=d.persistent_workers, shuffle_buffer=d.shuffle_buffer, decode=d.decode)


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune as configured; return the metrics written to ``<run dir>/metrics.json``.

    The launch, the shard dir, ``model.init`` and the image size are checked before the run dir is
    touched. Raises LaunchConfigError (a launch config cass-dist refuses, e.g. DeepSpeed with
    accumulation), ManifestError (bad shard dir), WeightsUnavailableError / ExportError /
    BackboneError / ClassifierError (a bad ``model.init``), ConfigError (no image size to use),
    CheckpointError (bad ``--resume``), NonFiniteLossError.
    """
    check_launch(batch_size=cfg.data.batch_size, grad_accum_steps=cfg.run.grad_accum_steps, clip_grad=cfg.run.clip_grad)
    manifest = load_manifest(cfg.data.shards)
    source = read_init(cfg.model.init)
    if source.kind == "classifier":
        raise ClassifierError(f"model.init {source.path}: a fine-tuned classifier, not a pretraining run or export; "
                              f"fine-tune from the run it started from")
    check_init_files(source, branches_of(cfg.model.branch))
    size, why = resolve_image_size(cfg.data, manifest, source, branches_of(cfg.model.branch))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    run = Run(cfg.run, config=cfg)
    try:
        run.print(f"image size {why}")
        return _train(cfg, run, manifest, source)
    finally:
        run.finish()


def _train(cfg: FinetuneConfig, run: Run, manifest: Manifest, source: InitSource) -> dict:
    acc, accum, stop = run.accelerator, cfg.run.grad_accum_steps, cfg.early_stop
    model = build_classifier(cfg.model, manifest, cfg.data.image_size, source)
    optimizer, base_lrs = build_optimizer(cfg, model)
    parts = [g["part"] for g in optimizer.param_groups]  # before prepare: DeepSpeed may rebuild the groups
    if cfg.optim.freeze_backbone_steps and acc.num_processes > 1:
        # Frozen backbones get no gradient; DDP must not wait for one (a graph walk per step, only for these runs).
        acc.ddp_handler = acc.ddp_handler or DistributedDataParallelKwargs()
        acc.ddp_handler.find_unused_parameters = True
    model, optimizer = acc.prepare(model, optimizer)
    state = run.resume(finetune_fingerprint(cfg, manifest, acc.num_processes))  # refuses a changed run
    classifier = acc.unwrap_model(model)
    loss_fn = FinetuneLoss(cfg, manifest, acc.device)
    track = state.extra.setdefault("early_stop", {"best": None, "best_step": 0, "bad_evals": 0, "done": False})
    d = cfg.data
    if d.verify_shards:
        check_digests(d.shards, [d.train_split, d.val_split, d.test_split], accelerator=acc)

    batches_per_epoch = len(build_train_loader(cfg, acc, 0, 0))
    total_steps, steps_per_epoch = count_steps(batches_per_epoch, grad_accum_steps=accum, max_steps=cfg.run.max_steps,
                                               epochs=cfg.run.epochs, split=cfg.data.train_split,
                                               min_steps=cfg.run.min_steps)
    eval_every = stop.eval_every
    lengthened = total_steps > cfg.run.epochs * steps_per_epoch and not cfg.run.max_steps
    if lengthened and not eval_every:  # keep one validation per requested epoch, not one per (tiny) epoch
        eval_every = -(-total_steps // cfg.run.epochs)
    run.print(f"fine-tuning {cfg.model.branch} from {cfg.model.init} on {manifest.task} "
              f"({manifest.num_classes} classes, label fraction {cfg.data.label_fraction}): {total_steps} steps"
              + (f" (run.min_steps; run.epochs {cfg.run.epochs} would be {cfg.run.epochs * steps_per_epoch}), "
                 f"validating every {eval_every}" if lengthened else ""))

    transform = manifest_transform(d.train_transform, manifest, image_size=d.image_size or None)

    def forward(batch: dict) -> dict:
        images = transform(batch["image"].to(acc.device, non_blocking=True), seed=batch["seed"])[0]
        return {"loss": loss_fn(model(images), batch["label"].to(acc.device))}

    bad_in_a_row, loss_sum, loss_count = 0, torch.zeros((), device=acc.device), 0
    stopping = False  # agreed by all ranks (run.should_stop); run.stop_signal alone is per-process
    skips = SkipTracker(manifest, d.shards, d.train_split, d.max_skipped_fraction, print_fn=run.print)
    eval_loaders: dict = {}  # built once: their workers serve every validation
    # One loader for the whole run: each iter() is the next epoch, served by the same workers.
    loader = build_train_loader(cfg, acc, state.epoch, state.data_position or state.batch_in_epoch)
    while state.global_step < total_steps and not track["done"] and not stopping:
        epoch_batches, batches, consumed = len(loader), iter(loader), 0
        model.train()
        while state.global_step < total_steps:
            window = list(itertools.islice(batches, accum))
            if len(window) < accum:  # the loader ended before len() said: the epoch's end
                state.epoch, state.batch_in_epoch, state.data_position = state.epoch + 1, 0, {}
                break
            if classifier.backbones_frozen != frozen_at(cfg, state.global_step):
                classifier.freeze_backbones(frozen_at(cfg, state.global_step))
                run.print(f"step {state.global_step}: backbones {'frozen' if classifier.backbones_frozen else 'unfrozen'}")
            factors = lr_factors(cfg, state.global_step, total_steps)
            set_lrs(optimizer, [lr * factors[part] for lr, part in zip(base_lrs, parts)], 1.0)
            finite, window_loss, _, stop_agreed, overflow = optimizer_step(
                acc, model, optimizer, window, forward, clip_grad=cfg.run.clip_grad, stop_requested=run.stop_requested)
            state.overflow_steps += overflow
            if finite:
                loss_sum += window_loss
                loss_count += len(window)
            state.global_step += 1
            state.batch_in_epoch += accum
            consumed += accum
            state.data_position = data_position(loader, consumed)  # in global samples: any layout resumes it
            epoch_done = consumed + accum > epoch_batches
            if epoch_done:
                state.epoch, state.batch_in_epoch, state.data_position = state.epoch + 1, 0, {}
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            state.nonfinite_steps += 0 if finite else 1
            if bad_in_a_row >= cfg.run.max_nonfinite_steps:
                raise NonFiniteLossError(f"the fine-tuning loss was non-finite for {bad_in_a_row} steps in a row "
                                         f"(step {state.global_step}); lower optim.lr or use run.precision fp32")

            if state.global_step % cfg.run.log_every == 0 and loss_count:
                train_loss = float(acc.reduce(loss_sum, "mean")) / loss_count
                run.log(state.global_step, {"train_loss": train_loss, "lr": optimizer.param_groups[-1]["lr"],
                                            "epoch": state.epoch, "skipped_samples": skips.check(loader, acc, state.epoch),
                                            "nonfinite_steps": state.nonfinite_steps,
                                            "overflow_steps": state.overflow_steps})
                loss_sum.zero_()
                loss_count = 0
            last = state.global_step == total_steps
            if (eval_every and state.global_step % eval_every == 0) or (not eval_every and epoch_done) or last:
                _validate(cfg, run, model, manifest, state, track, loaders=eval_loaders)
                run.save(state)
                model.train()
            stopping = run.should_stop(stop_agreed)  # agreed in the step's collective: no extra sync
            if track["done"] or stopping or epoch_done:
                break
    if stopping:
        run.save(state)
        run.print(f"stop requested at step {state.global_step}: checkpointed; resume with --resume auto")
        return {}
    if track["best"] is None:  # the metric was never defined (NaN): keep the last model as the best
        _save_best(cfg, run, model, manifest, state, math.nan)
    skips.check(loader, acc, state.epoch)
    if skips.total:
        run.print(skips.describe())
    return _finish(cfg, run, manifest, state, track, loaders=eval_loaders)


def _validate(cfg: FinetuneConfig, run: Run, model, manifest: Manifest, state: TrainState, track: dict,
              loaders: dict | None = None) -> None:
    """Score val, log it, keep ``best/`` on improvement and count evaluations without one."""
    acc, stop = run.accelerator, cfg.early_stop
    metrics = evaluate_classifier(acc.unwrap_model(model), acc, cfg.data, cfg.data.val_split, loaders=loaders)
    value = metrics[stop.metric]
    run.log(state.global_step, {f"val_{k}": v for k, v in metrics.items() if isinstance(v, float)})
    improved = not math.isnan(value) and (track["best"] is None or value > track["best"] + stop.min_delta)
    if improved:
        track.update(best=value, best_step=state.global_step, bad_evals=0)
        _save_best(cfg, run, model, manifest, state, value)
    else:
        track["bad_evals"] += 1
        if stop.patience and track["bad_evals"] >= stop.patience:
            track["done"] = True
            run.print(f"early stop at step {state.global_step}: val {stop.metric} has not improved for "
                      f"{track['bad_evals']} evaluations (best {track['best']:.4f} at step {track['best_step']})")
    best = math.nan if track["best"] is None else track["best"]
    run.print(f"step {state.global_step}: val {stop.metric} {value:.4f} (best {best:.4f})")


def _save_best(cfg: FinetuneConfig, run: Run, model, manifest: Manifest, state: TrainState, value: float) -> None:
    """Write the current model as ``best/`` (call on every rank: ZeRO-3 shards are gathered)."""
    acc = run.accelerator
    state_dict = acc.get_state_dict(model)
    if run.is_main:
        save_classifier(acc.unwrap_model(model), state_dict, run.dir / BEST_DIR, class_names=manifest.class_names,
                        extra={"step": state.global_step, "metric": cfg.early_stop.metric, "value": value,
                               "init": cfg.model.init, "manifest_digest": manifest.digest()})
    acc.wait_for_everyone()


def _finish(cfg: FinetuneConfig, run: Run, manifest: Manifest, state: TrainState, track: dict,
            loaders: dict | None = None) -> dict:
    """Evaluate ``best/`` on val and test, write metrics.json and the plots; return the metrics."""
    acc = run.accelerator
    best = load_classifier(run.dir / BEST_DIR, manifest).to(acc.device)
    val = evaluate_classifier(best, acc, cfg.data, cfg.data.val_split, loaders=loaders)
    test = evaluate_classifier(best, acc, cfg.data, cfg.data.test_split, loaders=loaders)
    result = {
        "kind": "finetune", "dataset": dataset_name(manifest, cfg.data.shards), "task": manifest.task,
        "init": cfg.model.init, "branch": cfg.model.branch, "label_fraction": cfg.data.label_fraction,
        "seed": cfg.run.seed, "best_step": track["best_step"], "steps": state.global_step,
        "early_stopped": bool(track["done"]), "selection_metric": cfg.early_stop.metric,
        "split": cfg.data.test_split, "val": val, "test": test, "config": asdict(cfg),
    }
    if run.is_main:
        write_metrics(run.dir / "metrics.json", result)
        images = [plot_curves(run.metrics_path, run.dir / "curves.png"),
                  plot_confusion_matrix(test["confusion_matrix"], test["class_names"],
                                        run.dir / "confusion_matrix.png", task=manifest.task,
                                        title=f"{cfg.data.test_split}: {cfg.model.branch} from {cfg.model.init}")]
        log_images(acc, images, step=state.global_step)
        write_json_atomic(run.dir / "early_stop.json", track)
        run.print(f"test {cfg.early_stop.metric} {test[cfg.early_stop.metric]:.4f}, accuracy {test['accuracy']:.4f}, "
                  f"AUROC {test['auroc_macro']:.4f} (best step {track['best_step']}); {run.dir / 'metrics.json'}")
    acc.wait_for_everyone()
    return result

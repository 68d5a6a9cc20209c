"""Frozen-feature evaluation: feature extraction over a loader, weighted kNN and a linear probe.

These judge a pretrained backbone without fine-tuning it. Features are gathered across ranks so
every rank sees the whole split; kNN and the probe then run identically everywhere (they are cheap
next to the forward passes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from cass_dist.data import build_loader, load_manifest
from cass_dist.engine.classifier import (
    ClassifierError,
    branches_of,
    build_backbone,
    check_classes,
    dataset_name,
    evaluate_classifier,
    load_classifier,
)
from cass_dist.engine.inits import check_init_files, read_init, resolve_image_size
from cass_dist.engine.run import Run
from cass_dist.metrics import compute_metrics, gather_predictions, write_metrics
from cass_dist.plots import log_images, plot_confusion_matrix

DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0)


def backbone_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return pooled pre-logit features (B x D) of a timm backbone, whatever its head.

    timm models expose ``forward_head(..., pre_logits=True)``, which skips the classifier even when
    one is attached; other modules are called directly and must return B x D.
    """
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    return model(images)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: Iterable[dict],
    *,
    accelerator=None,
    device: torch.device | str | None = None,
    transform=None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Run a frozen backbone over an evaluation loader and gather the result from all ranks.

    ``transform`` is the device transform of the loader's uint8 batches (default: the loader's own
    ``device_transform("eval")``); float batches of other loaders are used as they come.
    Returns ``(features, labels, keys)`` on CPU, sorted by key, covering the whole split: features
    are float32 N x D, labels int64 N or float32 N x C. Raises ValueError when no rank saw a sample.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = accelerator.device if accelerator is not None else (param.device if param is not None else "cpu")
    if transform is None and hasattr(loader, "device_transform"):
        transform = loader.device_transform("eval")
    was_training = model.training
    model.eval()
    feats, labels, keys = [], [], []
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    with autocast:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            if images.dtype == torch.uint8:
                if transform is None:
                    raise ValueError("extract_features: uint8 batches need a device transform (transform=...)")
                images = transform(images, seed=batch.get("seed", 0))[0]
            feats.append(backbone_features(model, images).float())
            labels.append(batch["label"].to(device))
            keys.extend(batch["key"])
    model.train(was_training)
    local_feats = torch.cat(feats) if feats else None
    local_labels = torch.cat(labels) if labels else None
    return gather_predictions(accelerator, local_feats, local_labels, keys)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted cosine kNN (as in DINO): each of the k nearest neighbours votes exp(cos / T).

    ``train_labels`` are class ids (N,) for multi-class/binary tasks or 0/1 vectors (N x C) for
    multi-label ones. Returns class probabilities (Q x C, rows sum to 1) for class ids, and per-label
    probabilities in [0, 1] (the weighted share of neighbours carrying each label) for multi-label.
    Raises ValueError on mismatched shapes or a non-positive k / temperature.
    """
    if train_feats.ndim != 2 or query_feats.ndim != 2 or train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"knn_predict: features must be N x D and Q x D with the same D, got "
                         f"{tuple(train_feats.shape)} and {tuple(query_feats.shape)}")
    if len(train_labels) != len(train_feats):
        raise ValueError(f"knn_predict: {len(train_labels)} labels for {len(train_feats)} training features")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn_predict: k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    if train_labels.ndim == 1:
        if train_labels.numel() and (train_labels.min() < 0 or train_labels.max() >= num_classes):
            raise ValueError(f"knn_predict: labels must lie in [0, {num_classes}), "
                             f"got [{int(train_labels.min())}, {int(train_labels.max())}]")
        votes_per_sample = F.one_hot(train_labels.long(), num_classes).float()
    else:
        if train_labels.shape[1] != num_classes:
            raise ValueError(f"knn_predict: multi-label targets have {train_labels.shape[1]} columns, "
                             f"expected num_classes={num_classes}")
        votes_per_sample = train_labels.float()
    k = min(k, len(train))
    out = []
    for start in range(0, len(query_feats), chunk_size):
        query = F.normalize(query_feats[start:start + chunk_size].float(), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)
        # Subtract the row max before exp: the same weights up to a factor, without overflow.
        weights = ((sims - sims.max(dim=1, keepdim=True).values) / temperature).exp()
        votes = (weights.unsqueeze(-1) * votes_per_sample[idx]).sum(dim=1)
        out.append(votes / weights.sum(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def _probe_score(model, feats: np.ndarray, labels: np.ndarray) -> float:
    """Macro F1 on val: the metric we report, and robust to imbalance where accuracy is not."""
    return f1_score(labels, model.predict(feats), average="macro", zero_division=0)


def linear_probe(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    val_feats: torch.Tensor | np.ndarray,
    val_labels: torch.Tensor | np.ndarray,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = 1000,
    seed: int = 0,
) -> Pipeline:
    """Fit standardised logistic regression on frozen features, choosing C by val macro F1.

    Multi-label targets (N x C 0/1) get one binary regression per label. Returns the fitted sklearn
    pipeline for the best C (``predict_proba`` gives Q x C probabilities; for multi-class it has a
    column per class seen in training); its ``best_C_`` and ``val_scores_`` attributes record the search.
    Raises ValueError when Cs is empty or the training labels hold a single class.
    """
    if not Cs:
        raise ValueError("linear_probe: Cs is empty; give at least one inverse regularisation strength")
    x_train, y_train = _numpy(train_feats), _numpy(train_labels)
    x_val, y_val = _numpy(val_feats), _numpy(val_labels)
    multi_label = y_train.ndim == 2
    if not multi_label and len(np.unique(y_train)) < 2:
        raise ValueError("linear_probe: the training labels hold a single class; nothing to separate")
    best, best_score, scores = None, -np.inf, {}
    for c in Cs:
        regression = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        model = make_pipeline(StandardScaler(), OneVsRestClassifier(regression) if multi_label else regression)
        model.fit(x_train, y_train)
        scores[c] = _probe_score(model, x_val, y_val)
        if scores[c] > best_score:
            best, best_score = model, scores[c]
    best.best_C_ = max(scores, key=scores.get)
    best.val_scores_ = scores
    return best


def probe_probabilities(model: Pipeline, feats, num_classes: int) -> np.ndarray:
    """Return Q x num_classes probabilities from a fitted probe, with zero columns for classes it never saw."""
    probs = model.predict_proba(_numpy(feats))
    if probs.shape[1] == num_classes:
        return probs
    classes = model[-1].classes_
    full = np.zeros((probs.shape[0], num_classes))
    full[:, classes.astype(int)] = probs
    return full


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ----------------------------------------------------------------------------- the evaluate driver
def evaluate(cfg) -> dict:
    """Evaluate as configured (an ``EvaluateConfig``); return the metrics written to ``metrics.json``.

    ``probe.kind`` knn / linear: frozen backbone features of ``model.init`` (a pretraining run or
    export, ``random``, ``imagenet``, or a fine-tuned run whose backbone is then used), fitted on the
    train split (``label_fraction`` of it), the linear probe's C chosen on val, scored on
    ``probe.split``; ``branch both`` averages the branches' probabilities. ``head``: the fine-tuned
    classifier at ``model.init`` scored on ``probe.split``.
    The shard dir, ``model.init`` and the image size (the init's own unless ``--image-size``) are
    checked before the run dir is touched. Raises ManifestError, WeightsUnavailableError / ExportError
    (nothing usable at ``model.init``), ClassifierError (a damaged fine-tuned run, classes differing
    from its head's, ``--probe head`` on a pretraining run), BackboneError, ConfigError (no image size).
    """
    manifest = load_manifest(cfg.data.shards)
    source = read_init(cfg.model.init)
    if cfg.probe.kind == "head" and source.kind != "classifier":
        raise ClassifierError(f"model.init {cfg.model.init}: --probe head needs a fine-tuned run (with "
                              f"best/classifier.json); use --probe knn or linear for a pretraining run")
    branches = tuple(source.info["branches"]) if source.kind == "classifier" and cfg.probe.kind == "head" \
        else branches_of(cfg.model.branch)
    if source.kind == "classifier":
        check_classes(source.info, manifest, source.path)
        missing = sorted(set(branches) - set(source.info["branches"]))
        if missing:
            raise ClassifierError(f"model.init {cfg.model.init}: the fine-tuned run has no {' or '.join(missing)} "
                                  f"branch (it has {sorted(source.info['branches'])}); pass --branch to pick one")
    check_init_files(source, branches)
    size, why = resolve_image_size(cfg.data, manifest, source, branches)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    run = Run(cfg.run, config=cfg)
    try:
        acc, d, p = run.accelerator, cfg.data, cfg.probe
        run.print(f"image size {why}")
        finetuned = load_classifier(source.path, manifest) if source.kind == "classifier" else None
        if p.kind == "head":
            metrics = evaluate_classifier(finetuned.to(acc.device), acc, d, p.split)
        else:
            probs = []
            for branch in branches:
                if finetuned is not None:
                    backbone = finetuned.backbones[branch]
                else:
                    backbone = build_backbone(cfg.model, branch, size, source)[0]
                probs.append(_probe_branch(backbone.to(acc.device), acc, cfg, manifest))
            labels = probs[0][1]
            metrics = compute_metrics(torch.stack([pr for pr, _ in probs]).mean(0), labels, task=manifest.task,
                                      class_names=manifest.class_names)
        branch = cfg.model.branch
        if p.kind == "head":  # the classifier decides which branches it has
            branch = "both" if len(finetuned.backbones) == 2 else next(iter(finetuned.backbones))
        result = {"kind": p.kind, "dataset": dataset_name(manifest, d.shards), "task": manifest.task,
                  "init": cfg.model.init, "branch": branch, "label_fraction": d.label_fraction,
                  "seed": cfg.run.seed, "split": p.split, p.split: metrics}
        if run.is_main:
            write_metrics(run.dir / "metrics.json", result)
            png = plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"],
                                        run.dir / "confusion_matrix.png", task=manifest.task,
                                        title=f"{p.split}: {p.kind} on {branch} from {cfg.model.init}")
            log_images(acc, [png])
            run.print(f"{p.kind} on {p.split}: F1 {metrics['f1_macro']:.4f}, accuracy {metrics['accuracy']:.4f}, "
                      f"AUROC {metrics['auroc_macro']:.4f}; {run.dir / 'metrics.json'}")
        return result
    finally:
        run.finish()


def _probe_branch(backbone, accelerator, cfg, manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (probabilities on probe.split, its labels) from a kNN or linear probe on frozen features."""
    d, p = cfg.data, cfg.probe

    def features(split: str, fraction: float = 1.0):
        loader = build_loader(d.shards, split, batch_size=d.eval_batch, train=False,
                              rank=accelerator.process_index, world_size=accelerator.num_processes,
                              num_workers=d.num_workers, image_size=d.image_size or None, transform="eval",
                              label_fraction=fraction, fraction_seed=d.fraction_seed, device=accelerator.device,
                              prefetch_factor=d.prefetch_factor, decode=d.decode)
        return extract_features(backbone, loader, accelerator=accelerator)

    train_feats, train_labels, _ = features(d.train_split, d.label_fraction)
    query_feats, query_labels, _ = features(p.split)
    if p.kind == "knn":
        probs = knn_predict(train_feats, train_labels, query_feats, num_classes=manifest.num_classes,
                            k=p.k, temperature=p.temperature)
        return probs, query_labels
    val_feats, val_labels, _ = features(d.val_split)
    model = linear_probe(train_feats, train_labels, val_feats, val_labels, Cs=p.Cs, seed=cfg.run.seed)
    return torch.as_tensor(probe_probabilities(model, query_feats, manifest.num_classes)), query_labels

"""Classification metrics over predictions gathered from every rank; scikit-learn does the maths.

Metrics are computed once per split, over the whole split (never averaged over batches or ranks),
from class probabilities:

- multi-class and binary: probabilities N x C (rows sum to 1), labels are class ids N; the
  prediction is the argmax;
- multi-label: per-label probabilities N x C, labels are 0/1 N x C; a label is predicted at >= 0.5.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    roc_auc_score,
)

from cass_dist.data.manifest import TASKS, write_json_atomic

# Names of the scalar metrics; early stopping and reports pick from these.
SCALAR_METRICS = ("f1_macro", "accuracy", "balanced_accuracy", "auroc_macro")


def compute_metrics(probs, labels, *, task: str, class_names: list[str] | None = None) -> dict:
    """Return the metrics of one split as a dict.

    Keys: ``f1_macro``, ``f1_per_class``, ``accuracy`` (exact match for multi-label),
    ``balanced_accuracy`` (mean over labels for multi-label), ``auroc_macro`` (mean over the classes
    whose AUROC is defined), ``auroc_per_class``, ``confusion_matrix`` (C x C, or C x 2 x 2 for
    multi-label), ``num_samples``, ``class_names`` and ``notes``. An AUROC that is undefined because a
    class is absent from (or is every one of) the labels is NaN, with a note saying which.
    Raises ValueError on an unknown task, mismatched shapes or an empty split.
    """
    probs, labels = _numpy(probs).astype(np.float64), _numpy(labels)
    if task not in TASKS:
        raise ValueError(f"compute_metrics: task {task!r} is not one of {TASKS}")
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"compute_metrics: need probabilities N x C and N labels, got {probs.shape} and {labels.shape}")
    if len(probs) == 0:
        raise ValueError("compute_metrics: no samples; the split is empty")
    num_classes = probs.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"compute_metrics: {len(names)} class names for {num_classes} probability columns")
    if task == "multi-label":
        result = _multi_label(probs, labels.astype(int), names)
    else:
        labels = labels.astype(int)
        if labels.ndim != 1 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"compute_metrics: {task} labels must be class ids in [0, {num_classes}), "
                             f"got shape {labels.shape}")
        result = _single_label(probs, labels, names)
    result.update(num_samples=int(len(labels)), class_names=names)
    return result


def _single_label(probs: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    classes = list(range(len(names)))
    pred = probs.argmax(axis=1)
    per_class_f1 = f1_score(labels, pred, labels=classes, average=None, zero_division=0)
    notes = []
    if len(classes) == 2:
        # Binary: one AUROC, that of the positive class (class 0's is the same number).
        auroc = _auroc(labels == 1, probs[:, 1], names[1], notes)
        per_class_auroc = [auroc, auroc]
    else:
        per_class_auroc = [_auroc(labels == c, probs[:, c], names[c], notes) for c in classes]
    absent = [names[c] for c in classes if not (labels == c).any()]
    if absent:
        notes.append(f"classes absent from the labels (their F1 is 0 and counts in the macro mean): {absent}")
    return {
        "f1_macro": float(np.mean(per_class_f1)),
        "f1_per_class": per_class_f1.tolist(),
        "accuracy": float(accuracy_score(labels, pred)),
        # sklearn averages recall over the classes present in the labels only.
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "auroc_macro": _nanmean(per_class_auroc),
        "auroc_per_class": per_class_auroc,
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
        "notes": notes,
    }


def _multi_label(probs: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    if labels.shape != probs.shape:
        raise ValueError(f"compute_metrics: multi-label labels must be N x C like the probabilities, "
                         f"got {labels.shape} and {probs.shape}")
    pred = (probs >= 0.5).astype(int)
    notes: list[str] = []
    per_label_auroc = [_auroc(labels[:, c] == 1, probs[:, c], names[c], notes) for c in range(len(names))]
    per_label_balanced = [balanced_accuracy_score(labels[:, c], pred[:, c]) for c in range(len(names))]
    return {
        "f1_macro": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "f1_per_class": f1_score(labels, pred, average=None, zero_division=0).tolist(),
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(np.mean(per_label_balanced)),
        "auroc_macro": _nanmean(per_label_auroc),
        "auroc_per_class": per_label_auroc,
        "confusion_matrix": multilabel_confusion_matrix(labels, pred).tolist(),
        "notes": notes,
    }


def _auroc(is_positive: np.ndarray, scores: np.ndarray, name: str, notes: list[str]) -> float:
    if is_positive.all() or not is_positive.any():
        notes.append(f"AUROC of {name!r} is undefined: the labels hold "
                     f"{'only' if is_positive.all() else 'no'} positives for it")
        return math.nan
    return float(roc_auc_score(is_positive, scores))


def _nanmean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def gather_predictions(accelerator, probs: torch.Tensor | None, labels: torch.Tensor | None, keys: list[str]
                       ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Gather per-rank rows (of any count, zero included) from every rank, exactly once each.

    Each rank pads its rows to the largest count, all ranks gather, and the padding is cut off
    again, so nothing is dropped or duplicated (unlike ``gather_for_metrics``, which assumes an
    evenly sharded map-style loader). ``probs`` may be any N x ... tensor (features too); a rank
    without samples passes None. Returns ``(probs, labels, keys)`` on CPU, every rank the same,
    sorted by key so the result does not depend on the number of ranks.
    Raises ValueError when the row counts disagree or no rank has a sample.
    """
    local = len(keys)
    if (probs is not None and len(probs) != local) or (labels is not None and len(labels) != local):
        raise ValueError(f"gather_predictions: {local} keys but {None if probs is None else len(probs)} "
                         f"rows and {None if labels is None else len(labels)} labels on this rank")
    if accelerator is not None and accelerator.num_processes > 1:
        probs, labels, keys = _gather_all(accelerator, probs, labels, keys)
    if probs is None or len(keys) == 0:
        raise ValueError("gather_predictions: no rank evaluated a sample; is the split empty?")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    index = torch.as_tensor(order, dtype=torch.long)
    return probs.cpu()[index], labels.cpu()[index], [keys[i] for i in order]


def _gather_all(accelerator, probs, labels, keys):
    from accelerate.utils import gather_object

    # A rank with no rows still has to join every collective with a correctly shaped tensor.
    meta = gather_object([None if probs is None else (tuple(probs.shape[1:]), probs.dtype,
                                                      tuple(labels.shape[1:]), labels.dtype)])
    known = next((m for m in meta if m is not None), None)
    if known is None:
        return None, None, []
    if probs is None:
        probs = torch.zeros((0, *known[0]), dtype=known[1])
        labels = torch.zeros((0, *known[2]), dtype=known[3])
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([len(keys)], device=device)).tolist()
    width = max(counts)
    gathered = []
    for tensor in (probs, labels):
        padded = torch.zeros((width, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[: len(tensor)] = tensor.to(device)
        rows = accelerator.gather(padded).reshape(len(counts), width, *tensor.shape[1:])
        gathered.append(torch.cat([rows[r, :n] for r, n in enumerate(counts)]).cpu())
    all_keys = gather_object(list(keys))
    return gathered[0], gathered[1], all_keys


def to_jsonable(metrics: dict) -> dict:
    """Return a copy with NaN replaced by None (JSON has no NaN), recursively."""
    def convert(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, (np.floating, np.integer)):
            return convert(value.item())
        return value
    return convert(metrics)


def write_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Write metrics to JSON atomically, NaN as null."""
    write_json_atomic(path, to_jsonable(metrics))


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

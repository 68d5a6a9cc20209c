"""PNG plots of a run: training / validation curves and the confusion matrix (matplotlib Agg), also to W&B.

Plots are written atomically (temp name, then rename) like every other file of a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

VAL_CURVES = ("val_f1_macro", "val_accuracy", "val_balanced_accuracy", "val_auroc_macro")


def read_records(metrics_jsonl: str | os.PathLike) -> list[dict]:
    """Return the records of a ``metrics.jsonl`` (one JSON object per line); raise FileNotFoundError."""
    lines = Path(metrics_jsonl).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_curves(metrics_jsonl: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Plot the training loss and the validation metrics against the step; return the PNG path.

    Raises FileNotFoundError when ``metrics_jsonl`` is missing, ValueError when it holds no
    training loss and no validation metric.
    """
    records = read_records(metrics_jsonl)
    loss = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = {name: [(r["step"], r[name]) for r in records if r.get(name) is not None] for name in VAL_CURVES}
    if not loss and not any(val.values()):
        raise ValueError(f"{metrics_jsonl}: no train_loss or val_* records to plot")
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    if loss:
        ax_loss.plot(*zip(*loss), label="train loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="training")
    for name, points in val.items():
        if points:
            ax_val.plot(*zip(*points), marker="o", label=name.removeprefix("val_"))
    ax_val.set(xlabel="step", ylabel="score", ylim=(0, 1.02), title="validation")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", fontsize=8)
    return _save(fig, out)


def plot_confusion_matrix(matrix: Sequence, class_names: Sequence[str], out: str | os.PathLike, *,
                          task: str = "multi-class", title: str = "") -> Path:
    """Plot a confusion matrix (C x C; multi-label: one 2 x 2 per label) with counts; return the PNG path.

    Rows are true classes, columns predictions; colours are row-normalised so rare classes stay legible.
    Raises ValueError when the matrix does not match ``class_names``.
    """
    cm = np.asarray(matrix)
    names = list(class_names)
    if task == "multi-label":
        if cm.shape != (len(names), 2, 2):
            raise ValueError(f"multi-label confusion matrix must be {len(names)} x 2 x 2, got {cm.shape}")
        panels = [(cm[i], ["neg", "pos"], names[i]) for i in range(len(names))]
    else:
        if cm.shape != (len(names), len(names)):
            raise ValueError(f"confusion matrix must be {len(names)} x {len(names)}, got {cm.shape}")
        panels = [(cm, names, title or "confusion matrix")]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    size = max(4.0, 0.5 * len(panels[0][1]) + 2)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (counts, labels, panel_title) in zip(axes.flat, panels):
        totals = counts.sum(axis=1, keepdims=True)
        shares = counts / np.maximum(totals, 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted", ylabel="true",
               title=panel_title)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(labels, fontsize=8)
    if task == "multi-label" and title:
        fig.suptitle(title)
    return _save(fig, out)


def log_images(accelerator, paths: Sequence[str | os.PathLike], *, step: int | None = None) -> None:
    """Send PNGs to W&B when a W&B tracker is active on this accelerator (main process); else do nothing."""
    if accelerator is None or not accelerator.is_main_process:
        return
    trackers = [t for t in getattr(accelerator, "trackers", []) if t.name == "wandb"]
    if not trackers:
        return
    import wandb

    trackers[0].log({Path(p).stem: wandb.Image(str(p)) for p in paths}, step=step)


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out

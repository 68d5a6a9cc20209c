"""The downstream classifier: backbone(s) from an init + a new head per branch; build, save, load, evaluate.

Where the backbones come from (``model.init``) and at which image size is ``cass_dist.engine.inits``.
A saved classifier is ``classifier.safetensors`` + ``classifier.json``; the JSON carries each branch's
timm name, keywords and stem, and the image size, so it loads without the pretraining run it started from.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from cass_dist.configs.finetune import DownstreamDataSection, DownstreamModelSection
from cass_dist.data import build_loader
from cass_dist.data.manifest import Manifest
from cass_dist.engine.inits import (
    FORMAT_VERSION,
    INFO_FILE,
    WEIGHTS_FILE,
    ClassifierError,
    InitSource,
    build_backbone,
    classifier_dir,
    read_classifier_info,
)
from cass_dist.metrics import compute_metrics, gather_predictions
from cass_dist.models import BackboneError, build_from_spec

__all__ = ["Classifier", "ClassifierError", "branches_of", "build_backbone", "build_classifier", "dataset_name",
           "check_classes", "evaluate_classifier", "is_classifier_dir", "load_classifier", "save_classifier"]


def branches_of(branch: str) -> tuple[str, ...]:
    """Return the backbone branches a ``--branch`` value uses; raise ClassifierError for an unknown one."""
    if branch not in ("cnn", "vit", "both"):
        raise ClassifierError(f"model.branch must be cnn, vit or both, got {branch!r}")
    return ("cnn", "vit") if branch == "both" else (branch,)


class Classifier(nn.Module):
    """One or two backbones, each with its own linear head for the task.

    ``forward(images)`` returns ``{branch: logits}`` (N x C; N for binary, one logit for the positive
    class); ``probabilities(logits)`` turns them into N x C class probabilities, averaged over branches.
    """

    def __init__(self, backbones: dict[str, nn.Module], *, task: str, num_classes: int, dropout: float = 0.0,
                 specs: dict[str, dict] | None = None, image_size: int | None = None):
        super().__init__()
        self.task, self.num_classes = task, num_classes
        self.specs = specs or {}
        self.image_size = image_size
        self.backbones_frozen = False
        outputs = 1 if task == "binary" else num_classes
        self.backbones = nn.ModuleDict(backbones)
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, outputs))
            for name, backbone in backbones.items()
        })

    def freeze_backbones(self, frozen: bool) -> None:
        """Freeze (or unfreeze) every backbone; returns None.

        Frozen backbones run in eval mode (BatchNorm statistics stay, dropout is off), without autograd
        (no backward through them) and with ``requires_grad`` off, so their parameters get no gradient
        and the optimizer keeps no state for them. Under DDP this needs ``find_unused_parameters``.
        """
        self.backbones_frozen = frozen
        for param in self.backbones.parameters():
            param.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        """Set training mode like ``nn.Module.train``; frozen backbones stay in eval mode."""
        super().train(mode)
        if self.backbones_frozen:
            self.backbones.eval()
        return self

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, backbone in self.backbones.items():
            with torch.no_grad() if self.backbones_frozen else nullcontext():
                features = backbone(images)
            logits = self.heads[name](features)
            out[name] = logits[:, 0] if self.task == "binary" else logits
        return out

    def probabilities(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return N x C probabilities (softmax, or sigmoid per label / for the positive class), branch-averaged."""
        probs = []
        for out in logits.values():
            out = out.float()
            if self.task == "multi-class":
                probs.append(out.softmax(dim=1))
            elif self.task == "binary":
                positive = out.sigmoid()
                probs.append(torch.stack([1 - positive, positive], dim=1))
            else:
                probs.append(out.sigmoid())
        return torch.stack(probs).mean(dim=0)


def build_classifier(model_cfg: DownstreamModelSection, manifest: Manifest, image_size: int | None = None,
                     source: InitSource | None = None) -> Classifier:
    """Return a Classifier for the manifest's task with backbone(s) from ``model_cfg.init`` at ``image_size``.

    Raises what :func:`cass_dist.engine.inits.build_backbone` raises.
    """
    built = {branch: build_backbone(model_cfg, branch, image_size, source) for branch in branches_of(model_cfg.branch)}
    return Classifier({b: m for b, (m, _) in built.items()}, task=manifest.task, num_classes=manifest.num_classes,
                      dropout=model_cfg.head_dropout, specs={b: s for b, (_, s) in built.items()},
                      image_size=image_size)


def save_classifier(model: Classifier, state_dict: dict[str, torch.Tensor], out_dir: str | os.PathLike,
                    *, class_names: list[str], extra: dict | None = None) -> Path:
    """Write ``classifier.safetensors`` + ``classifier.json`` into ``out_dir`` atomically; return ``out_dir``.

    The files are written to a sibling temp dir that then replaces ``out_dir``, so ``out_dir`` is
    always either the previous complete classifier or the new one.
    """
    out = Path(out_dir)
    tmp, old = out.with_name(f".tmp-{out.name}"), out.with_name(f".old-{out.name}")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / WEIGHTS_FILE))
    info = {"format_version": FORMAT_VERSION, "task": model.task, "class_names": list(class_names),
            "dropout": float(model.heads[next(iter(model.heads))][0].p), "branches": model.specs,
            "image_size": model.image_size, "extra": extra or {}}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, default=str))
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def is_classifier_dir(path: str | os.PathLike) -> bool:
    """Return True when ``path`` (or its ``best/``) holds a saved fine-tuned classifier."""
    return classifier_dir(Path(path)) is not None


def load_classifier(path: str | os.PathLike, manifest: Manifest | None = None) -> Classifier:
    """Return the fine-tuned Classifier saved at ``path`` (its dir, or a fine-tuning run dir with ``best/``).

    With ``manifest``, its task and class names must equal the checkpoint head's. Raises
    ClassifierError (no classifier there, a damaged one, or classes / task differing from the
    dataset's), ExportError (timm keywords refused), BackboneError (weights that do not fit the
    recorded architecture).
    """
    found = classifier_dir(Path(path))
    if found is None:
        raise ClassifierError(f"{path}: no fine-tuned classifier ({INFO_FILE} + {WEIGHTS_FILE}, "
                              f"or best/ holding them); run launch/finetune.py first")
    info = read_classifier_info(found)
    if manifest is not None:
        check_classes(info, manifest, found)
    backbones = {b: build_from_spec(spec) for b, spec in info["branches"].items()}
    model = Classifier(backbones, task=info["task"], num_classes=len(info["class_names"]),
                       dropout=info.get("dropout", 0.0), specs=info["branches"], image_size=info.get("image_size"))
    try:
        weights = load_file(str(found / WEIGHTS_FILE))
    except Exception as err:  # safetensors' SafetensorError: a truncated or foreign file
        raise ClassifierError(f"{found / WEIGHTS_FILE}: not a readable safetensors file ({err})") from err
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise BackboneError(f"{found / WEIGHTS_FILE} does not fit the architecture in {INFO_FILE}: {err}") from err
    return model


def check_classes(info: dict, manifest: Manifest, where: str | os.PathLike) -> None:
    """Raise ClassifierError unless a saved classifier's task and class names are the dataset's."""
    if info["class_names"] != manifest.class_names or info["task"] != manifest.task:
        raise ClassifierError(f"{where}: the checkpoint's head was trained for {info['task']} classes "
                              f"{info['class_names']}, but the dataset has {manifest.task} classes "
                              f"{manifest.class_names}")


@torch.no_grad()
def evaluate_classifier(model: Classifier, accelerator, data_cfg: DownstreamDataSection, split: str,
                        loaders: dict | None = None) -> dict:
    """Return compute_metrics over the whole ``split`` (every rank evaluates its share; gathered exactly).

    ``loaders`` (a dict kept by the caller) keeps the split's loader, and its workers, for the next call.
    """
    loaders = {} if loaders is None else loaders
    if split not in loaders:
        loaders[split] = build_loader(
            data_cfg.shards, split, batch_size=data_cfg.eval_batch, train=False, rank=accelerator.process_index,
            world_size=accelerator.num_processes, num_workers=data_cfg.num_workers,
            image_size=data_cfg.image_size or None, transform="eval", device=accelerator.device,
            prefetch_factor=data_cfg.prefetch_factor, persistent_workers=data_cfg.persistent_workers,
            decode=data_cfg.decode)
    loader = loaders[split]
    transform = loader.device_transform("eval")
    was_training = model.training
    model.eval()
    probs, labels, keys = [], [], []
    with accelerator.autocast():
        for batch in loader:
            images = transform(batch["image"].to(accelerator.device, non_blocking=True), seed=batch["seed"])[0]
            probs.append(model.probabilities(model(images)))
            labels.append(batch["label"].to(accelerator.device))
            keys.extend(batch["key"])
    model.train(was_training)
    gathered = gather_predictions(accelerator, torch.cat(probs) if probs else None,
                                  torch.cat(labels) if labels else None, keys)
    return compute_metrics(gathered[0], gathered[1], task=loader.manifest.task,
                           class_names=loader.manifest.class_names)


def dataset_name(manifest: Manifest, shards: str | os.PathLike) -> str:
    """Return a short dataset name for reports: the source's name argument, else the shard dir's name."""
    args = manifest.source.get("args", {}) if isinstance(manifest.source, dict) else {}
    for key in ("name", "flag", "dataset"):
        if isinstance(args.get(key), str) and args[key]:
            return args[key]
    return Path(shards).resolve().name

"""Downstream configs: ``FinetuneConfig`` (launch/finetune.py) and ``EvaluateConfig`` (launch/evaluate.py).

Both reuse the shared machinery of ``configs/base.py`` (defaults < preset < YAML < flags, errors
naming the dotted field) and its ``RunSection`` (output dir, seed, precision, trackers, epochs,
warmup, checkpoints), so a fine-tuning run is configured and resumed like a pretraining run.

``model.init`` says where the backbone weights come from:

- ``random``: fresh weights for the architecture in ``model.cnn`` / ``model.vit`` (+ ``*_kwargs``);
- ``imagenet``: timm hub weights for that architecture (needs network or a filled cache);
- a pretraining run dir, its ``export/`` dir or a ``.safetensors`` file: the CASS backbone(s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cass_dist.configs.base import RUN_ALIASES, FieldError, RunSection, parse_config
from cass_dist.configs.pretrain import LoaderFields
from cass_dist.metrics import SCALAR_METRICS

BUILTIN_INITS = ("random", "imagenet")


@dataclass
class DownstreamDataSection(LoaderFields):
    shards: str = ""  # directory holding manifest.json (made by cass-shards)
    train_split: str = "train"  # split the head (and backbone) trains on
    val_split: str = "val"  # split for early stopping and the linear probe's C
    test_split: str = "test"  # split scored at the end
    batch_size: int = 32  # per process
    eval_batch_size: int = 0  # 0 = batch_size
    image_size: int = 0  # 0 = the export's image size (init from a run), else the manifest's
    label_fraction: float = 1.0  # stratified share of the training labels used
    fraction_seed: int = 0  # which stratified subset; fixed across seeds so runs compare on the same labels
    train_transform: str = "finetune"  # augmentation of training images ("eval": none)

    def validate(self) -> None:
        if not self.shards:
            raise FieldError("shards", "required: a shard directory made by cass-shards (--data DIR)")
        if not 0 < self.label_fraction <= 1:
            raise FieldError("label_fraction", "must be in (0, 1] (a share of the training labels)",
                             self.label_fraction)
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                raise FieldError(name, "must be >= 1", getattr(self, name))
        if self.eval_batch_size < 0:
            raise FieldError("eval_batch_size", "must be >= 0", self.eval_batch_size)
        if self.image_size != 0 and self.image_size < 8:  # as pretraining: smaller cannot hold a stem or a patch grid
            raise FieldError("image_size", "must be >= 8, or 0 for the export's (else the manifest's) size",
                             self.image_size)
        self.validate_loader()

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


@dataclass
class DownstreamModelSection:
    init: str = "random"  # random | imagenet | pretraining run dir | export dir | .safetensors file
    branch: Literal["cnn", "vit", "both"] = "cnn"  # "both" averages the two branches' probabilities
    cnn: str = "resnet18"  # architecture for init random / imagenet
    vit: str = "vit_tiny_patch16_224"  # the same for the ViT branch
    cnn_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    vit_kwargs: dict[str, Any] = field(default_factory=dict)  # the same for the ViT (img_size, patch_size ...)
    # init random / imagenet only (an export keeps the stem and patch size it was trained with):
    small_stem: bool | None = None  # CNN stem: stride-1 3x3 conv, no max-pool; None = on at image size <= 64
    vit_patch_size: int | None = None  # None: the model's own, or the largest smaller one giving >= 16 tokens
    head_dropout: float = 0.0  # dropout before the classifier head
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, slower

    def validate(self) -> None:
        if not self.init:
            raise FieldError("init", f"must be one of {BUILTIN_INITS} or a run dir / export dir / .safetensors file")
        if not 0 <= self.head_dropout < 1:
            raise FieldError("head_dropout", "must be in [0, 1)", self.head_dropout)
        if self.vit_patch_size is not None and self.vit_patch_size < 1:
            raise FieldError("vit_patch_size", "must be >= 1 or null", self.vit_patch_size)


@dataclass
class LossSection:
    # ce without class weights, as MedMNIST v2's protocol: with focal + inverse-frequency weights a
    # 28 px resnet18 lost 4 accuracy points on BreastMNIST (docs/downstream.md#baseline); focal and
    # class weights trade accuracy for minority-class recall, one flag each
    name: Literal["focal", "ce"] = "ce"  # ce: cross-entropy (multi-class) or BCE (binary, multi-label)
    gamma: float = 2.0  # focal focusing strength (loss.name focal only)
    class_weights: bool = False  # weigh classes by the manifest's class_weights (rare classes weigh more)
    alpha: float | None = None  # binary / multi-label only: weight of positives, instead of class_weights

    def validate(self) -> None:
        if self.gamma < 0:
            raise FieldError("gamma", "must be >= 0", self.gamma)
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise FieldError("alpha", "must be in [0, 1] (weight of positives) or null", self.alpha)
        if self.alpha is not None and self.class_weights:
            raise FieldError("alpha", "set either alpha or class_weights, not both", self.alpha)


@dataclass
class FinetuneOptimSection:
    lr: float = 3e-4  # head and last block; earlier blocks get lr * layer_decay ** depth
    weight_decay: float = 0.05  # AdamW weight decay (norms and biases get none)
    layer_decay: float = 1.0  # 1.0 = off; e.g. 0.75 for ViTs
    # Heads alone first (a linear probe), then everything (LP-FT, Kumar et al. 2022): a random head's
    # early gradients would otherwise overwrite pretrained features. The backbones then get their own warmup.
    freeze_backbone_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates

    def validate(self) -> None:
        if not self.lr > 0:
            raise FieldError("lr", "must be > 0", self.lr)
        if self.weight_decay < 0:
            raise FieldError("weight_decay", "must be >= 0", self.weight_decay)
        if not 0 < self.layer_decay <= 1:
            raise FieldError("layer_decay", "must be in (0, 1] (1 = off)", self.layer_decay)
        if self.freeze_backbone_steps < 0:
            raise FieldError("freeze_backbone_steps", "must be >= 0", self.freeze_backbone_steps)


@dataclass
class EarlyStopSection:
    metric: str = "f1_macro"  # validation metric to maximise
    # 0: train every epoch and keep the best on val, as MedMNIST v2's protocol (docs/downstream.md#baseline)
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0  # an improvement must exceed this
    eval_every: int = 0  # steps between validations; 0 = once per epoch

    def validate(self) -> None:
        if self.metric not in SCALAR_METRICS:
            raise FieldError("metric", f"must be one of {list(SCALAR_METRICS)}", self.metric)
        for name in ("patience", "eval_every"):
            if getattr(self, name) < 0:
                raise FieldError(name, "must be >= 0", getattr(self, name))
        if self.min_delta < 0:
            raise FieldError("min_delta", "must be >= 0", self.min_delta)


@dataclass
class FinetuneConfig:
    """Fine-tune a CASS (or random / ImageNet) backbone on a labelled shard set."""

    data: DownstreamDataSection = field(default_factory=DownstreamDataSection)
    model: DownstreamModelSection = field(default_factory=DownstreamModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: FinetuneOptimSection = field(default_factory=FinetuneOptimSection)
    early_stop: EarlyStopSection = field(default_factory=EarlyStopSection)
    # 50 epochs: 10 (with early stopping) left a 28 px resnet18 from scratch 16 points short on BreastMNIST.
    # At least 500 steps: 50 epochs of BreastMNIST's 10% (55 images) are 50 steps, which left a resnet18
    # from scratch 23 F1 points short of 500 and made any pretrained start look better than it is
    # (docs/downstream.md, "Few labels")
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/finetune", epochs=50,
                                                               min_steps=500, keep_last=1, log_every=10))


@dataclass
class ProbeSection:
    kind: Literal["knn", "linear", "head"] = "knn"  # head: a fine-tuned run's own classifier
    k: int = 20  # kNN neighbours
    temperature: float = 0.07  # kNN vote weights exp(similarity / temperature)
    Cs: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])  # linear probe inverse regularisations tried on val
    split: str = "test"  # the split scored; kNN / linear fit on train (C chosen on val)

    def validate(self) -> None:
        if self.k < 1:
            raise FieldError("k", "must be >= 1", self.k)
        if not self.temperature > 0:
            raise FieldError("temperature", "must be > 0", self.temperature)
        if not self.Cs or any(c <= 0 for c in self.Cs):
            raise FieldError("Cs", "must be a non-empty list of positive numbers", self.Cs)


@dataclass
class EvaluateConfig:
    """Evaluate frozen features (kNN, linear probe) or a fine-tuned classifier on a labelled shard set."""

    data: DownstreamDataSection = field(default_factory=DownstreamDataSection)
    model: DownstreamModelSection = field(default_factory=DownstreamModelSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    run: RunSection = field(default_factory=lambda: RunSection(output_dir="runs/evaluate"))

    def validate(self) -> None:
        if self.run.resume:  # an evaluation trains nothing and writes no checkpoint to come back to
            raise FieldError("run.resume", "launch/evaluate.py has no checkpoints to resume; rerun it without "
                             "--resume (it takes a minute), or resume the fine-tuning run", self.run.resume)


def small() -> FinetuneConfig:
    """Tiny CPU fine-tuning (resnet18 / 6-block vit_tiny, patch 8, at 32 px) matching the ``demo`` pretraining."""
    cfg = FinetuneConfig()
    cfg.model.vit_kwargs = {"img_size": 32, "patch_size": 8, "depth": 6}
    cfg.data.image_size = 32
    cfg.run.precision = "fp32"
    cfg.run.epochs = 5
    cfg.run.min_steps = 0  # a quick CPU check: 5 epochs are what it asks for
    return cfg


FINETUNE_PRESETS = {"small": small}
EVALUATE_PRESETS: dict[str, Any] = {}

_COMMON_ALIASES = {
    **RUN_ALIASES,
    "--data": "data.shards", "--batch-size": "data.batch_size", "--image-size": "data.image_size",
    "--num-workers": "data.num_workers", "--label-fraction": "data.label_fraction",
    "--init": "model.init", "--branch": "model.branch", "--cnn": "model.cnn", "--vit": "model.vit",
}
FINETUNE_ALIASES = {
    **_COMMON_ALIASES,
    "--loss": "loss.name", "--gamma": "loss.gamma", "--lr": "optim.lr", "--layer-decay": "optim.layer_decay",
    "--weight-decay": "optim.weight_decay", "--metric": "early_stop.metric", "--patience": "early_stop.patience",
    "--eval-every": "early_stop.eval_every", "--freeze-backbone-steps": "optim.freeze_backbone_steps",
}
EVALUATE_ALIASES = {**_COMMON_ALIASES, "--probe": "probe.kind", "--k": "probe.k", "--split": "probe.split"}


def parse_finetune_config(argv: list[str] | None = None) -> FinetuneConfig:
    """Return the validated FinetuneConfig from flags (see ``--help``); raise ConfigError naming the field."""
    return parse_config(FinetuneConfig, argv, presets=FINETUNE_PRESETS, aliases=FINETUNE_ALIASES,
                        prog="launch/finetune.py")


def parse_evaluate_config(argv: list[str] | None = None) -> EvaluateConfig:
    """Return the validated EvaluateConfig from flags (see ``--help``); raise ConfigError naming the field."""
    return parse_config(EvaluateConfig, argv, presets=EVALUATE_PRESETS, aliases=EVALUATE_ALIASES,
                        prog="launch/evaluate.py")

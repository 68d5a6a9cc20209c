"""The CASS pretraining config and its presets (``demo``, ``paper``, ``t4``).

Presets:

- ``demo``: resnet18 + vit_tiny at 32 px (patch 8) on the synthetic shards, CPU, a few
  minutes on 2 cores; what ``accelerate launch launch/pretrain.py`` runs with no arguments.
- ``paper``: the original CASS hyperparameters (Singh & Cirrone): resnet50 + vit_base_patch16_384
  from ImageNet weights, 384 px, the 1000-d classifier outputs as embeddings, the paper objective
  (batch mean of 2 - 2cos, no stop-gradient), Adam with lr 1e-3 for both branches, no weight decay,
  cosine decay, batch 16, one augmented view shared by both branches with the paper's augmentations
  (resize, colour jitter, perspective and affine with p=0.3, flips), fp32 in the original (``auto``
  here picks bf16 on GPUs that have it).
- ``t4``: the paper's model sizes on a 16 GB T4: fp16 with loss scaling plus gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cass_dist.configs.base import RUN_ALIASES, FieldError, RunSection, parse_config
from cass_dist.configs.methods import DinoSection

# One constant, chosen by benchmarks/objectives.py and owned by the objectives module.
from cass_dist.losses.cass import DEFAULT_OBJECTIVE


@dataclass
class LoaderFields:
    """How a data section's shards are streamed: the fields pretraining and fine-tuning share."""

    # loader processes per training process; auto: min(8, cores per process - 1) on a GPU, 0 on a CPU
    # with fewer than 8 cores per process (docs/data.md)
    num_workers: int | Literal["auto"] = "auto"
    prefetch_factor: int = 2  # batches each loader worker keeps ready
    persistent_workers: bool = True  # one set of workers for every epoch and evaluation (no restarts)
    shuffle_buffer: int = 1000  # undecoded samples each worker shuffles through
    decode: Literal["cpu", "gpu"] = "cpu"  # gpu: workers ship JPEG bytes, nvJPEG decodes them on the training GPU
    max_skipped_fraction: float = 0.01  # stop when an epoch skips more than this share as corrupted
    verify_shards: bool = False  # check every shard's sha256 against the manifest before training

    def validate_loader(self) -> None:
        """Raise FieldError naming the loader field that is out of range."""
        if self.num_workers != "auto" and self.num_workers < 0:
            raise FieldError("num_workers", "must be >= 0 or auto", self.num_workers)
        for name in ("prefetch_factor", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise FieldError(name, "must be >= 1", getattr(self, name))
        if not 0 <= self.max_skipped_fraction <= 1:
            raise FieldError("max_skipped_fraction", "must be in [0, 1]", self.max_skipped_fraction)


@dataclass
class DataSection(LoaderFields):
    shards: str = ""  # directory holding manifest.json (made by cass-shards)
    train_split: str = "train"  # split the model trains on
    val_split: str = "val"  # used by the periodic kNN when the shard set has labels
    batch_size: int = 32  # per process
    image_size: int = 224  # pixels, square: images are resized/cropped to this
    transform: Literal["pretrain", "ssl", "eval"] = "pretrain"  # the paper's; crops, jitter, blur; none
    # 2: each branch gets its own augmentation of the image, so agreeing means ignoring what the
    # augmentations change; from scratch this learns far better features at the same cost a step
    # (docs/pretraining.md). 1: the paper, both branches see the same augmented image.
    views: Literal[1, 2] = 2

    def validate(self) -> None:
        if not self.shards:
            raise FieldError("shards", "required: a shard directory made by cass-shards (--data DIR)")
        if self.batch_size < 1:
            raise FieldError("batch_size", "must be >= 1", self.batch_size)
        self.validate_loader()
        if self.image_size < 8:
            raise FieldError("image_size", "must be >= 8", self.image_size)


@dataclass
class ModelSection:
    """Arguments of ``cass_dist.models.CASS`` plus how the engine runs it."""

    cnn: str = "resnet50"  # timm name of the CNN branch
    vit: str = "vit_base_patch16_224"  # timm name of the ViT branch
    embed_dim: int = 1000  # the paper uses the 1000-d ImageNet classifier outputs
    # mlp: a BatchNorm projector per branch, which keeps the ViT from collapsing under the default
    # objective (docs/objectives.md); linear: the timm classifier outputs, as in the paper
    head: Literal["linear", "mlp"] = "mlp"
    proj_hidden_dim: int = 2048  # hidden width of the mlp projector heads
    vit_patch_size: int | None = None  # None: the model's own, or the largest smaller one giving >= 16 tokens
    small_stem: bool | None = None  # CNN stem: stride-1 3x3 conv, no max-pool; None = on at image_size <= 64
    drop_path_rate: float | None = None  # stochastic depth of both branches; None: the model's own
    pretrained: bool = False  # timm hub weights (network, or a filled cache_dir)
    pretrained_cnn_file: str = ""  # local weights for compute nodes without internet
    pretrained_vit_file: str = ""  # the same for the ViT
    cache_dir: str = ""  # timm/HF hub cache for --pretrained (a filled one works offline)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    channels_last: bool = True  # memory format of the CNN and its input (faster convs on GPUs)
    compile: bool = False  # torch.compile each backbone in place
    # SyncBatchNorm in the whole pretrainer (CNN, projector heads, predictors): auto = when more than one
    # process runs on CUDA; true = the same, but refuse CPU processes; false = per-process statistics
    sync_bn: bool | Literal["auto"] = "auto"

    def validate(self) -> None:
        for name in ("cnn", "vit"):
            if not getattr(self, name):
                raise FieldError(name, "must name a timm model")
        for name in ("embed_dim", "proj_hidden_dim"):
            if getattr(self, name) < 1:
                raise FieldError(name, "must be >= 1", getattr(self, name))
        if self.vit_patch_size is not None and self.vit_patch_size < 1:
            raise FieldError("vit_patch_size", "must be >= 1 or null", self.vit_patch_size)
        if self.drop_path_rate is not None and not 0 <= self.drop_path_rate < 1:
            raise FieldError("drop_path_rate", "must be in [0, 1) or null", self.drop_path_rate)


@dataclass
class ObjectiveSection:
    name: str = DEFAULT_OBJECTIVE  # "paper" is exactly the original loss
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to build_objective
    # batch statistics (vicreg, barlow) over the global batch, every rank's embeddings gathered with
    # gradient (true), or over each rank's own micro-batch (false: the objective changes with world size)
    gather: bool = True

    def validate(self) -> None:
        if not self.name:
            raise FieldError("name", "must name an objective (e.g. 'paper')")


@dataclass
class OptimSection:
    optimizer: Literal["adamw", "adam"] = "adamw"  # adamw: decoupled weight decay; adam: as in the paper
    lr_cnn: float = 1e-3  # peak learning rate of the CNN branch (after warmup)
    lr_vit: float = 1e-3  # peak learning rate of the ViT branch
    weight_decay_cnn: float = 0.0  # weight decay of the CNN branch (norms and biases get none)
    weight_decay_vit: float = 0.0  # weight decay of the ViT branch
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decay rates
    eps: float = 1e-8  # Adam denominator epsilon

    def validate(self) -> None:
        for name in ("lr_cnn", "lr_vit"):
            if not getattr(self, name) > 0:
                raise FieldError(name, "must be > 0", getattr(self, name))
        for name in ("weight_decay_cnn", "weight_decay_vit"):
            if getattr(self, name) < 0:
                raise FieldError(name, "must be >= 0", getattr(self, name))
        if not self.eps > 0:
            raise FieldError("eps", "must be > 0", self.eps)
        if not all(0 <= b < 1 for b in self.betas):
            raise FieldError("betas", "must both be in [0, 1)", list(self.betas))


@dataclass
class MonitorSection:
    knn_every: int = 0  # steps between kNN evaluations on the val split; 0 = off
    knn_k: int = 20  # neighbours of the periodic kNN
    knn_max_train: int = 2000  # bank size: kNN is a health signal, not the final evaluation
    collapse_std_fraction: float = 0.1  # warn when embedding std < fraction / sqrt(d) ...
    collapse_min_eff_rank: float = 2.0  # ... or the effective rank falls below this

    def validate(self) -> None:
        if self.knn_every < 0:
            raise FieldError("knn_every", "must be >= 0", self.knn_every)
        if self.knn_k < 1:
            raise FieldError("knn_k", "must be >= 1", self.knn_k)
        if not 0 < self.collapse_std_fraction < 1:
            raise FieldError("collapse_std_fraction", "must be in (0, 1)", self.collapse_std_fraction)
        if self.collapse_min_eff_rank < 1:
            raise FieldError("collapse_min_eff_rank", "must be >= 1", self.collapse_min_eff_rank)


@dataclass
class PretrainConfig:
    """CASS pretraining: a CNN and a ViT learn together without labels."""

    method: Literal["cass", "dino"] = "cass"  # cass: the CNN and the ViT teach each other; dino: one backbone, EMA teacher
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    dino: DinoSection = field(default_factory=DinoSection)  # used by --method dino only


DEMO_SHARDS = "shards/demo"


def demo() -> PretrainConfig:
    """Tiny models on the synthetic shards: CPU, about two minutes on 2 cores."""
    return PretrainConfig(
        data=DataSection(shards=DEMO_SHARDS, batch_size=64, image_size=32),
        # timm's stem: the small stem (the default at 32 px) costs ~4-10x per CPU step, and the demo is a
        # 1.5-minute first run; small-image training (MedMNIST) keeps the default.
        model=ModelSection(cnn="resnet18", vit="vit_tiny_patch16_224", embed_dim=128, proj_hidden_dim=512,
                           vit_patch_size=8, channels_last=False, small_stem=False),
        optim=OptimSection(lr_cnn=1e-3, lr_vit=1e-3, weight_decay_cnn=0.05, weight_decay_vit=0.05),
        run=RunSection(output_dir="runs/demo", precision="fp32", max_steps=80, warmup_steps=10,
                       save_every=40, log_every=10, resume="auto"),  # a second launch continues, not clashes
        monitor=MonitorSection(knn_every=40, knn_max_train=1000),
    )


def paper() -> PretrainConfig:
    """The original CASS hyperparameters (see the module docstring)."""
    return PretrainConfig(
        data=DataSection(batch_size=16, image_size=384, views=1),
        model=ModelSection(cnn="resnet50", vit="vit_base_patch16_384", embed_dim=1000, head="linear",
                           pretrained=True),
        objective=ObjectiveSection(name="paper"),
        optim=OptimSection(optimizer="adam", lr_cnn=1e-3, lr_vit=1e-3),
        run=RunSection(output_dir="runs/paper", epochs=50),
    )


def t4() -> PretrainConfig:
    """The paper's models on a 16 GB T4: fp16 with loss scaling and gradient checkpointing."""
    cfg = paper()
    cfg.model.grad_checkpointing = True
    cfg.run.precision = "fp16"
    cfg.run.output_dir = "runs/t4"
    return cfg


PRESETS = {"demo": demo, "paper": paper, "t4": t4}

ALIASES = {
    **RUN_ALIASES,
    "--data": "data.shards", "--batch-size": "data.batch_size", "--image-size": "data.image_size",
    "--num-workers": "data.num_workers", "--views": "data.views", "--transform": "data.transform",
    "--objective": "objective.name", "--cnn": "model.cnn",
    "--vit": "model.vit", "--embed-dim": "model.embed_dim", "--pretrained": "model.pretrained",
    "--pretrained-cnn-file": "model.pretrained_cnn_file", "--pretrained-vit-file": "model.pretrained_vit_file",
    "--grad-checkpointing": "model.grad_checkpointing", "--compile": "model.compile",
    "--sync-bn": "model.sync_bn", "--head": "model.head", "--cache-dir": "model.cache_dir", "--lr-cnn": "optim.lr_cnn", "--lr-vit": "optim.lr_vit",
    "--knn-every": "monitor.knn_every",
}


def parse_pretrain_config(argv: list[str] | None = None, *, default_preset: str | None = None) -> PretrainConfig:
    """Return the validated PretrainConfig from flags (see ``--help``); raise ConfigError naming the field."""
    return parse_config(PretrainConfig, argv, presets=PRESETS, aliases=ALIASES,
                        default_preset=default_preset, prog="launch/pretrain.py")

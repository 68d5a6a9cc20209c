"""Models: timm backbones, the CASS pair, its pretraining wrapper, and backbone exports."""

from cass_dist.models.backbones import (
    BackboneError,
    WeightsUnavailableError,
    create_backbone,
    pooled_features,
    set_grad_checkpointing,
)
from cass_dist.models.cass import CASS
from cass_dist.models.export import export_backbones, load_backbone, read_export_info
from cass_dist.models.pretrainer import CASSPretrainer

__all__ = [
    "CASS",
    "BackboneError",
    "CASSPretrainer",
    "WeightsUnavailableError",
    "create_backbone",
    "export_backbones",
    "load_backbone",
    "pooled_features",
    "read_export_info",
    "set_grad_checkpointing",
]

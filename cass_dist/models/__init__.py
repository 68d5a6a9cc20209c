"""Models: timm backbones, the CASS pair, its pretraining wrapper, and backbone exports."""

from cass_dist.models.backbones import (
    BackboneError,
    BackboneSpec,
    WeightsUnavailableError,
    build_from_spec,
    create_backbone,
    plan_backbone,
    pooled_features,
    set_grad_checkpointing,
)
from cass_dist.models.cass import CASS
from cass_dist.models.errors import ExportError
from cass_dist.models.export import export_backbones, export_image_size, load_backbone, read_export_info
from cass_dist.models.pretrainer import CASSPretrainer

__all__ = [
    "CASS",
    "BackboneError",
    "BackboneSpec",
    "CASSPretrainer",
    "ExportError",
    "WeightsUnavailableError",
    "build_from_spec",
    "create_backbone",
    "export_backbones",
    "export_image_size",
    "load_backbone",
    "plan_backbone",
    "pooled_features",
    "read_export_info",
    "set_grad_checkpointing",
]

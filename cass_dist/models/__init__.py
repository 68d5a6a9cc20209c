"""Models: timm backbones and the CASS pair."""

from cass_dist.models.cass import CASS

__all__ = ["CASS"]

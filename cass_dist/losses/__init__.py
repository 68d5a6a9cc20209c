"""Loss functions, importable alone: ``from cass_dist.losses import cass_loss, focal_loss``."""

from cass_dist.losses.cass import cass_loss
from cass_dist.losses.focal import focal_loss

__all__ = ["cass_loss", "focal_loss"]

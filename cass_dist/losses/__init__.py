"""Loss functions, importable alone: ``from cass_dist.losses import cass_loss, build_objective, focal_loss``."""

from cass_dist.losses.cass import DEFAULT_OBJECTIVE, OBJECTIVES, build_objective, cass_loss
from cass_dist.losses.focal import focal_loss

__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "build_objective", "cass_loss", "focal_loss"]

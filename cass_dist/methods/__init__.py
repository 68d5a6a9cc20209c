"""Pretraining methods behind one contract (``cass_dist.methods.base.Method``), so one loop trains them all.

``build_method(cfg)`` returns the method ``cfg.method`` names: ``cass`` (the CNN and the ViT teach
each other, the default) or ``dino`` (one backbone and its EMA teacher). docs/methods.md has the
contract, DINO's defaults and how to add a method.
"""

from __future__ import annotations

from cass_dist.configs.pretrain import PretrainConfig
from cass_dist.methods.base import DeviceTransform, Method
from cass_dist.methods.cass import CASSMethod, build_cass
from cass_dist.methods.dino import DINOMethod, build_dino

BUILDERS = {"cass": build_cass, "dino": build_dino}

__all__ = ["BUILDERS", "CASSMethod", "DINOMethod", "DeviceTransform", "Method", "build_method"]


def build_method(cfg: PretrainConfig) -> Method:
    """Return the pretraining method ``cfg.method`` as one module (the engine wraps and trains it).

    Raises ValueError for an unknown method name, and what the method's builder raises (BackboneError,
    WeightsUnavailableError for bad models or weights, ValueError for a bad objective).
    """
    if cfg.method not in BUILDERS:
        raise ValueError(f"method: unknown method {cfg.method!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[cfg.method](cfg)

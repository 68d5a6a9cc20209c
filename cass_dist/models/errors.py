"""The models' error classes (one leaf module, so every models/ file can raise them without import cycles)."""

from __future__ import annotations

from cass_dist.errors import CassError


class BackboneError(CassError, ValueError):
    """A backbone name, a timm keyword or a weights file does not fit the requested architecture."""


class WeightsUnavailableError(CassError, FileNotFoundError):
    """Pretrained weights were requested but no file, cache or hub could provide them."""


class ExportError(CassError, ValueError):
    """An export (model.json + safetensors) or a saved classifier is damaged or holds what we refuse to load."""

"""Data layer: source files -> WebDataset shards + manifest -> streaming loader.

Import what you need: ``from cass_dist.data import build_loader, load_manifest``. ``build_loader``
is imported lazily: the ``cass-shards`` CLI and its worker processes never need torch.
"""

from cass_dist.data.manifest import Manifest, ManifestError, load_manifest

__all__ = ["Manifest", "ManifestError", "build_loader", "load_manifest"]


def __getattr__(name: str):
    if name == "build_loader":
        from cass_dist.data.stream import build_loader

        return build_loader
    raise AttributeError(f"module 'cass_dist.data' has no attribute {name!r}")

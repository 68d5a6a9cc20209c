"""Data layer: source files -> WebDataset shards + manifest -> streaming loader.

Import what you need: ``from cass_dist.data import build_loader, load_manifest``.
"""

from cass_dist.data.manifest import Manifest, ManifestError, load_manifest
from cass_dist.data.stream import build_loader

__all__ = ["Manifest", "ManifestError", "build_loader", "load_manifest"]

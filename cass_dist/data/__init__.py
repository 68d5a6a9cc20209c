"""Data layer: source files -> WebDataset shards + manifest -> streaming loader.

Import what you need: ``from cass_dist.data import build_loader, load_manifest``. ``build_loader``
is imported lazily: the ``cass-shards`` CLI and its worker processes never need torch.
"""

from cass_dist.data.manifest import Manifest, ManifestError, load_manifest

__all__ = ["Manifest", "ManifestError", "ShardLoader", "build_loader", "data_position", "load_manifest",
           "sum_across_ranks"]
_STREAM_NAMES = ("ShardLoader", "build_loader", "data_position", "sum_across_ranks")


def __getattr__(name: str):
    if name in _STREAM_NAMES:
        from cass_dist.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'cass_dist.data' has no attribute {name!r}")

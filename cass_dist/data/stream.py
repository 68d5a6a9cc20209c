"""Streaming loader over shards (placeholder: being written)."""


def build_loader(shards_dir, split, *, batch_size, train, rank=0, world_size=1, num_workers=0, seed=0,
                 epoch=0, image_size=None, label_fraction=1.0, **kwargs):
    raise NotImplementedError

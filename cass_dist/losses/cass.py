"""CASS objectives (placeholder: being written)."""


def cass_loss(z_cnn, z_vit):
    raise NotImplementedError

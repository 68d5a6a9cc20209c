"""CASS model (placeholder: being written)."""

import torch.nn as nn


class CASS(nn.Module):
    pass

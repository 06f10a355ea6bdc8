"""``nn.Module`` layers built from factors. Each layer keeps the hyper-parameters of the layer it replaces."""
from .lowrank import LowRankConv2d, LowRankLinear

__all__ = ["LowRankConv2d", "LowRankLinear"]

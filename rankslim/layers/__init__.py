"""``nn.Module`` layers built from factors. Each layer keeps the hyper-parameters of the layer it replaces."""
from .lowrank import LowRankConv2d, LowRankLinear
from .spatial import SpatialConv2d
from .tucker import TuckerConv2d
from .cp import CPConv2d
from .tt import TTLinear
from .sparse import LowRankSparseConv2d, LowRankSparseLinear, SparseConv2d, SparseLinear

__all__ = ["CPConv2d", "LowRankConv2d", "LowRankLinear", "LowRankSparseConv2d", "LowRankSparseLinear", "SparseConv2d",
           "SparseLinear", "SpatialConv2d", "TTLinear", "TuckerConv2d"]

"""``nn.Module`` layers built from factors. Each layer keeps the hyper-parameters of the layer it replaces."""
from .lowrank import LowRankConv2d, LowRankLinear
from .spatial import SpatialConv2d  # noqa: F401
from .tucker import TuckerConv2d  # noqa: F401
from .cp import CPConv2d  # noqa: F401
from .tt import TTLinear  # noqa: F401
from .sparse import LowRankSparseConv2d, LowRankSparseLinear, SparseConv2d, SparseLinear  # noqa: F401

__all__ = ["LowRankConv2d", "LowRankLinear"]

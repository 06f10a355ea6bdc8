"""Registered decomposition methods. Importing a module registers its methods (one line each)."""
from .base import METHODS, DecomposeContext, Method, get_method, register
from . import svd  # noqa: F401  (registers "svd")
from . import spatial  # noqa: F401  (registers "spatial")
from . import tucker  # noqa: F401  (registers "tucker")
from . import cp  # noqa: F401  (registers "cp")
from . import tt  # noqa: F401  (registers "tt")
from . import prune, zhang, godec, grebdec  # noqa: F401  (registers "prune", "prune-data", "zhang", "godec", "grebdec", "grebdec-ls")
from . import ddlr  # noqa: F401  (registers "ddlr")
from . import relu_admm  # noqa: F401  (registers "relu_admm")

__all__ = ["METHODS", "DecomposeContext", "Method", "get_method", "register"]

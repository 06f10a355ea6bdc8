"""Registered decomposition methods. Importing a module registers its methods (one line each)."""
from .base import METHODS, DecomposeContext, Method, get_method, register
from . import svd  # noqa: F401  (registers "svd")

__all__ = ["METHODS", "DecomposeContext", "Method", "get_method", "register"]

"""One family of errors. Every message says what went wrong and what to do next."""
from __future__ import annotations


class RankslimError(Exception):
    """Base class of every error rankslim raises on purpose."""


class ModelSpecError(RankslimError):
    """A model specification (``zoo:NAME``, ``torchvision:NAME``, a file, ``pkg.mod:fn``) cannot be resolved."""


class DataError(RankslimError):
    """A dataset is missing, empty or has the wrong shape."""


class InputShapeError(RankslimError):
    """The model cannot run on the given input shape."""


class InvalidWeightsError(RankslimError):
    """A weight tensor holds NaN or Inf values."""


class RankError(RankslimError):
    """A requested rank is impossible for a layer (for example larger than min(m, k))."""


class BudgetError(RankslimError):
    """A parameter / MAC budget cannot be met, or is malformed."""


class PlanError(RankslimError):
    """A plan does not match the model it is applied to."""


class CheckpointError(RankslimError):
    """A saved file is truncated, corrupt, or not a rankslim file."""


class UnsupportedLayerError(RankslimError):
    """A method was asked to decompose a layer type it does not support."""


class OptionError(RankslimError):
    """An option of a method or allocator is unknown, conflicts with another, or has a bad value."""

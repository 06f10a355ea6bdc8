"""rankslim: make trained PyTorch networks smaller and faster by low-rank and sparse decomposition."""
from __future__ import annotations

from .allocate import ALLOCATORS, Allocation, Allocator, Budget, get_allocator
from .api import CompressionResult, compress
from .cost import Cost, flop_counter_macs, model_cost
from .errors import (BudgetError, CheckpointError, DataError, InputShapeError, InvalidWeightsError,
                     ModelSpecError, OptionError, PlanError, RankError, RankslimError, UnsupportedLayerError)
from . import hf, pipeline, stream
from .io import load, read_plan, save
from .methods import METHODS, get_method
from .plan import Plan, apply_plan, get_plan
from .report import Report
from .stream import StreamedResult, compress_streamed, load_streamed
from .train import FinetuneResult, LRPETResult, finetune, train_lrpet, train_trp

__version__ = "0.1.0"

__all__ = [
    "ALLOCATORS", "METHODS", "Allocation", "Allocator", "Budget", "OptionError", "get_allocator", "hf", "pipeline", "BudgetError", "CheckpointError", "CompressionResult", "Cost", "DataError",
    "InputShapeError", "InvalidWeightsError", "ModelSpecError", "Plan", "PlanError", "RankError", "RankslimError",
    "Report", "UnsupportedLayerError", "apply_plan", "compress", "flop_counter_macs", "get_method", "get_plan",
    "load", "model_cost", "read_plan", "save", "stream", "StreamedResult", "compress_streamed", "load_streamed",
    "FinetuneResult", "LRPETResult", "finetune", "train_lrpet", "train_trp",
]

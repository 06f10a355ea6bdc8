"""Recovering and training compressed models: fine-tuning (with distillation and GreBdec's phased schedule),
LRPET, the TRP baseline, and the shared loop (checkpoint/resume, CSV metrics, curves, DDP). See docs/training.md."""
from __future__ import annotations

from .finetune import FinetuneResult, MaskGuard, distillation_loss, finetune
from .loop import FitResult, evaluate, fit, training_split
from .lrpet import LRPETResult, conv_bn_pairs, lrpet_rank, project_weight, to_compact, train_lrpet
from .trp import nuclear_norm, train_trp

__all__ = ["FinetuneResult", "FitResult", "LRPETResult", "MaskGuard", "conv_bn_pairs", "distillation_loss",
           "evaluate", "finetune", "fit", "lrpet_rank", "nuclear_norm", "project_weight", "to_compact",
           "train_lrpet", "train_trp", "training_split"]

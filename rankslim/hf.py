"""Hugging Face ``transformers`` round trip: ``save_pretrained`` / ``from_pretrained`` for compressed models.

A compressed model's own ``model.save_pretrained(dir)`` works (the library saves whatever ``state_dict`` the
module has), but ``AutoModel.from_pretrained(dir)`` cannot rebuild it: it builds the original architecture,
finds the factorized tensors unexpected and the dense ones missing, and fills them with *random* values (it only
prints a load report). So a compressed model is saved here as the library's ``config.json`` (and
``generation_config.json``) beside a ``model.rankslim`` file (plan + weights, see :mod:`rankslim.io`), and
:func:`from_pretrained` builds the architecture from the config, offline, then restores the plan and weights
into it. Nothing is downloaded; nothing in the file is executed (the architecture class is looked up by name
in the ``transformers`` package only).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from .errors import CheckpointError, ModelSpecError
from .io import load, save
from .outputs import write_outputs

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.rankslim"


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a compressed ``transformers`` model (from :func:`rankslim.compress`) to ``directory``.

    Writes ``config.json`` (with ``architectures`` set to the model's class), ``generation_config.json`` when
    the model has one, and ``model.rankslim``. The directory follows the CLI's output rules
    (:mod:`rankslim.outputs`): a non-empty directory rankslim did not write is refused unless ``force``, only
    these files are replaced, atomically, and nothing is deleted. Returns the directory.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ModelSpecError(f"{type(model).__name__} has no transformers config: save it with rankslim.save(model, "
                             "path) and load it with rankslim.load(path, model=<the original definition>)")
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    writers = {CONFIG_NAME: lambda p: Path(p).write_text(config.to_json_string(), encoding="utf-8"),
               WEIGHTS_NAME: lambda p: save(model, p)}
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_string"):
        writers[GENERATION_CONFIG_NAME] = lambda p: Path(p).write_text(gen.to_json_string(), encoding="utf-8")
    return write_outputs(directory, writers, force=force).path


def from_pretrained(directory: str | os.PathLike, model_class: type[nn.Module] | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained`: the architecture from ``config.json`` (``model_class``,
    else the ``transformers`` class named in its ``architectures``), then the plan and weights of
    ``model.rankslim``. Returns the compressed model in eval mode, with its generation config when saved."""
    import transformers

    d = Path(directory)
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{d} is not a directory written by rankslim.hf.save_pretrained (needs {CONFIG_NAME} "
                              f"and {WEIGHTS_NAME})")
    config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
    if model_class is None:
        names = list(getattr(config, "architectures", None) or [])
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ModelSpecError(f"{d / CONFIG_NAME} names no transformers architecture ({names or 'none'}); pass "
                                 "model_class=")
    skeleton = model_class(config)
    model = load(d / WEIGHTS_NAME, model=skeleton)
    if (d / GENERATION_CONFIG_NAME).is_file() and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(d), local_files_only=True)
    return model


__all__ = ["save_pretrained", "from_pretrained"]

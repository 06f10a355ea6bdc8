"""Reference models (LeNet-5, ResNet-20, a small ViT for 28x28 single-channel inputs) and model specifications.

A *model spec* is how the CLI and :func:`rankslim.compress` name a model:

=================================  ==========================================================
``zoo:NAME``                       a bundled reference model with its trained checkpoint
``torchvision:NAME``               a torchvision constructor with random weights
``torchvision:NAME@weights.pth``   the same, with a user ``state_dict`` (``weights_only=True``)
``path/to/model.pt`` / ``.pth``    a whole module saved with ``torch.save`` (unpickled: trusted files only)
``path/to/model.rankslim``         a compressed model written by :func:`rankslim.save`
``package.module:function``        a function returning an ``nn.Module`` (importable from the working directory too)
``path/to/file.py:function``       the same, from a Python file (runs that file, like an import)
=================================  ==========================================================

This module sits below :mod:`rankslim.io`: it reads ``.rankslim`` files through :mod:`rankslim.plan`
(:func:`~rankslim.plan.read_plan`, :func:`~rankslim.plan.restore`), and ``io`` imports it to resolve
the model a file was made from; neither needs the other at call time.

Checkpoints of the zoo live in ``rankslim/checkpoints/NAME.safetensors`` (tensors only, never
pickles) next to ``NAME.json`` (how they were trained). ``scripts/train_reference.py`` rebuilds them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import ModelSpecError
from .plan import Plan, read_plan, restore

#: where the committed reference checkpoints live (package data)
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"

#: per-sample input shape torchvision ImageNet models are measured at when the user gives none
TORCHVISION_INPUT_SHAPE: tuple[int, ...] = (3, 224, 224)


# --------------------------------------------------------------------------------------------- models


class LeNet5(nn.Module):
    """Classic LeNet-5 for 1x28x28 inputs (the variant used by the DDLR paper).

    ``conv1`` 1->6 5x5 pad 2 -> ReLU -> maxpool 2 -> ``conv2`` 6->16 5x5 -> ReLU -> maxpool 2 ->
    ``fc1`` 400->120 -> ReLU -> ``fc2`` 120->84 -> ReLU -> ``fc3`` 84->num_classes.
    61,706 parameters at 10 classes.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, 1, 28, 28) -> logits (N, num_classes)."""
        x = self.pool(self.relu(self.conv1(x)))   # (N, 6, 14, 14)
        x = self.pool(self.relu(self.conv2(x)))   # (N, 16, 5, 5)
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity shortcut or (option B) 1x1 conv+BN projection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, in_planes, H, W) -> (N, planes, H / stride, W / stride)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): stem conv 3x3 -> 3 stages x 3 basic blocks (16/32/64
    channels, stride 1/2/2) -> global average pool -> ``fc``.

    ``conv1``/``bn1`` are the stem, ``layer1..layer3`` the stages; ~0.27 M parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, 1)
        self.layer2 = self._stage(16, 32, 2)
        self.layer3 = self._stage(32, 64, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int, blocks: int = 3) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, in_channels, H, W) -> logits (N, num_classes); any H, W >= 4 works."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block of plain modules: ``ln1`` -> multi-head self-attention with
    separate ``q``/``k``/``v``/``proj`` Linears -> residual, ``ln2`` -> ``fc1`` -> GELU -> ``fc2`` -> residual.

    Separate projections (not ``nn.MultiheadAttention``'s packed ``in_proj_weight``) so every matrix
    is an ``nn.Linear`` rankslim can factorize.
    """

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, T, dim) tokens -> (N, T, dim)."""
        n, t, d = x.shape
        h = self.ln1(x)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(n, t, self.heads, d // self.heads).transpose(1, 2)   # (N, heads, T, dim/heads)

        a = nn.functional.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """A small Vision Transformer for 1x28x28 images: ``patch`` Conv2d (7x7 patches, stride 7 -> 16
    tokens) + a class token + learned position embeddings, ``blocks`` (``depth`` :class:`ViTBlock`),
    final ``norm`` and ``head`` Linear on the class token. ~0.1 M parameters at the defaults.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image: int = 28, patch: int = 7,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, in_channels, 28, 28) -> logits (N, num_classes)."""
        z = self.patch(x).flatten(2).transpose(1, 2)                 # (N, 16, dim)
        z = torch.cat([self.cls.expand(z.shape[0], -1, -1), z], 1) + self.pos  # shape[0], not len(): ONNX keeps the batch dynamic
        z = self.norm(self.blocks(z))
        return self.head(z[:, 0])


def lenet5(num_classes: int = 10) -> LeNet5:
    """LeNet-5 for (1, 28, 28) inputs with randomly initialised weights."""
    return LeNet5(num_classes)


def resnet20(num_classes: int = 10, in_channels: int = 1) -> ResNet20:
    """CIFAR-style BN ResNet-20 (widths 16/32/64, option-B shortcuts) with random weights."""
    return ResNet20(num_classes, in_channels)


def vit(num_classes: int = 10, in_channels: int = 1) -> ViT:
    """Small ViT for (1, 28, 28) inputs (7x7 patches, dim 64, 4 blocks, 4 heads) with random weights."""
    return ViT(num_classes, in_channels)


# ----------------------------------------------------------------------------------------- registry


class ZooEntry(NamedTuple):
    """One reference model: how to build it, what it was trained on, and its checkpoint file."""

    constructor: Callable[[], nn.Module]
    dataset: str
    input_shape: tuple[int, ...]
    checkpoint: str


#: name -> (constructor, dataset name, per-sample input shape, checkpoint file name in CHECKPOINT_DIR)
ZOO: dict[str, ZooEntry] = {
    "lenet5": ZooEntry(lenet5, "fashion-mnist", (1, 28, 28), "lenet5.safetensors"),
    "resnet20": ZooEntry(resnet20, "fashion-mnist", (1, 28, 28), "resnet20.safetensors"),
    "vit": ZooEntry(vit, "fashion-mnist", (1, 28, 28), "vit.safetensors"),
}


def _unknown_zoo(name: str) -> ModelSpecError:
    return ModelSpecError(f"unknown zoo model {name!r}; available zoo models: "
                          + ", ".join(f"zoo:{n}" for n in sorted(ZOO)))


def get_zoo_model(name: str, pretrained: bool = True) -> nn.Module:
    """Build the zoo model ``name`` (see :data:`ZOO`), in eval mode.

    With ``pretrained=True`` the committed checkpoint ``rankslim/checkpoints/NAME.safetensors`` is
    loaded (safetensors: tensors only, no code); if it is missing, :class:`ModelSpecError` says how
    to rebuild it. With ``pretrained=False`` the weights are random and no file is read.
    """
    if name not in ZOO:
        raise _unknown_zoo(name)
    entry = ZOO[name]
    model = entry.constructor()
    if pretrained:
        path = CHECKPOINT_DIR / entry.checkpoint
        if not path.is_file():
            raise ModelSpecError(f"the checkpoint of zoo:{name} is missing ({path}); rebuild it with "
                                 f"`python scripts/train_reference.py --model {name}`, or use pretrained=False")
        try:
            state = load_file(str(path), device="cpu")
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # a damaged or stale file: say which one and how to rebuild it
            raise ModelSpecError(f"cannot load {path} into zoo:{name} ({exc}); rebuild it with "
                                 f"`python scripts/train_reference.py --model {name}`") from exc
    return model.eval()


# ------------------------------------------------------------------------------------------- specs


@dataclass
class ModelSpec:
    """A resolved model: the module, its per-sample input shape and dataset when known, and the spec
    string it came from (``None`` for a module passed in directly)."""

    model: nn.Module
    input_shape: tuple[int, ...] | None
    dataset: str | None
    spec: str | None


def _torchvision_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models())


def _resolve_torchvision(spec: str, body: str, input_shape: tuple[int, ...] | None) -> ModelSpec:
    try:
        import torchvision
    except ImportError:
        raise ModelSpecError(f"{spec} needs torchvision: pip install torchvision (or rankslim[vision])") from None
    name, _, weights = body.partition("@")
    names = _torchvision_names()
    if name not in names:
        examples = [n for n in ("resnet18", "resnet50", "vgg16", "mobilenet_v2", "efficientnet_b0", "vit_b_16")
                    if n in names]
        raise ModelSpecError(f"unknown torchvision model {name!r}; for example torchvision:"
                             + ", torchvision:".join(examples)
                             + f" (all {len(names)}: torchvision.models.list_models())")
    model = torchvision.models.get_model(name, weights=None)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelSpecError(f"weights file {path} of {spec} does not exist")
        try:
            # weights_only: a state_dict is tensors, so nothing in the file can run code
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            model.load_state_dict(state)
        except Exception as exc:
            raise ModelSpecError(f"cannot load weights {path} into torchvision:{name}: {exc}") from exc
    return ModelSpec(model.eval(), tuple(input_shape) if input_shape else TORCHVISION_INPUT_SHAPE, None, spec)


class PickleWarning(UserWarning):
    """A whole-module ``.pt``/``.pth`` file is being unpickled: it can run any code it contains."""


#: pickled files already warned about in this process (each is warned about once)
_WARNED_PICKLES: set[str] = set()


def _warn_pickle(path: Path) -> None:
    key = str(path.resolve())
    if key in _WARNED_PICKLES:
        return
    _WARNED_PICKLES.add(key)
    warnings.warn(f"{path} is a pickled module: opening it runs any code it contains. Only open files you trust; "
                  "a .rankslim file or torchvision:NAME@weights.pth never runs code.", PickleWarning, stacklevel=4)


#: specs a file may name to rebuild its original model: they build code rankslim ships or torchvision's
SAFE_SPEC_PREFIXES = ("zoo:", "torchvision:")


def plan_base_model(plan: Plan, path: str | os.PathLike) -> nn.Module:
    """The original model a ``.rankslim`` file's ``plan`` was made from, for specs that run no foreign code.

    Only ``zoo:`` and ``torchvision:`` specs are followed (a ``torchvision:NAME@w.pth`` spec is
    rebuilt without its weights file: the ``.rankslim`` file holds every weight).  Any other spec
    would import or unpickle code the file names, so :class:`ModelSpecError` asks for the model.
    """
    spec = plan.model_spec
    if not spec or not spec.startswith(SAFE_SPEC_PREFIXES):
        raise ModelSpecError(f"{path} was made from {spec or 'a user model'}; pass the original model definition: "
                             "rankslim.load(path, model=MyModel())")
    return resolve_model(spec.split("@")[0] if spec.startswith("torchvision:") else spec).model


#: suffixes of whole modules saved with torch.save (unpickled, trusted files only)
PICKLED_SUFFIXES = (".pt", ".pth", ".pkl")


def _resolve_file(spec: str, input_shape: tuple[int, ...] | None) -> ModelSpec:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"model file {path} does not exist")
    if path.suffix == ".rankslim":
        plan = read_plan(path)
        model = restore(path, plan_base_model(plan, path))
        shape, dataset = input_shape, None
        if isinstance(plan.model_spec, str) and plan.model_spec.startswith("zoo:") and plan.model_spec[4:] in ZOO:
            entry = ZOO[plan.model_spec[4:]]
            shape, dataset = shape or entry.input_shape, entry.dataset
        elif isinstance(plan.model_spec, str) and plan.model_spec.startswith("torchvision:"):
            shape = shape or TORCHVISION_INPUT_SHAPE
        return ModelSpec(model, tuple(shape) if shape else None, dataset, spec)
    if path.suffix.lower() not in PICKLED_SUFFIXES:
        # never unpickle a file the user did not name as a saved module (a typo could name any file)
        raise ModelSpecError(f"{path} is not a model file rankslim opens: use a .rankslim file, a whole module saved "
                             f"with torch.save ({'/'.join(PICKLED_SUFFIXES)}), a Python file (file.py:function), "
                             "zoo:NAME or torchvision:NAME")
    _warn_pickle(path)
    try:
        # A whole pickled module: unpickling runs code from the file. Done only for a path the user
        # named explicitly, never for files discovered or referenced elsewhere.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelSpecError(f"cannot load {path} as a saved module: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(f"{path} holds a {type(obj).__name__}, not a whole nn.Module; for a state_dict use "
                             "torchvision:NAME@weights.pth or build the model in Python and pass it in")
    return ModelSpec(obj.eval(), tuple(input_shape) if input_shape else None, None, spec)


def _import_from_file(path: Path) -> object:
    """Import the Python file ``path`` as a module named after its stem (its folder importable meanwhile)."""
    if not path.is_file():
        raise ModelSpecError(f"Python file {path} does not exist")
    name = path.stem
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so the file can import its sibling modules
    # registered under its name so classes defined there pickle and deep-copy like any imported ones
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        raise
    finally:
        sys.path.remove(folder)
    return module


def _import_module(mod_name: str) -> object:
    """``importlib.import_module`` with the current working directory importable, as users expect of
    ``python -c`` and the ``rankslim`` command alike (the console script's ``sys.path`` lacks it)."""
    cwd = os.getcwd()
    add = cwd not in sys.path and "" not in sys.path
    if add:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(mod_name)
    finally:
        if add:
            sys.path.remove(cwd)


def _resolve_callable(spec: str, input_shape: tuple[int, ...] | None) -> ModelSpec:
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            module = _import_from_file(Path(mod_name).expanduser())
        else:
            module = _import_module(mod_name)
    except ModelSpecError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"cannot import {mod_name!r} from spec {spec!r}: {exc}") from exc
    fn = module
    try:
        for part in fn_name.split("."):
            fn = getattr(fn, part)
    except AttributeError:
        raise ModelSpecError(f"module {mod_name!r} has no attribute {fn_name!r}") from None
    if not callable(fn):
        raise ModelSpecError(f"{spec} is not callable")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return ModelSpec(model, tuple(input_shape) if input_shape else None, None, spec)


_SPEC_HELP = ("valid model specs: zoo:NAME (" + ", ".join(f"zoo:{n}" for n in sorted(ZOO)) + "), torchvision:NAME"
              "[@weights.pth], a saved module file (.pt/.pth/.rankslim), package.module:function or file.py:function")


def resolve_model(spec: str | nn.Module, input_shape: tuple[int, ...] | None = None) -> ModelSpec:
    """Turn a model spec (see the module docstring) or an ``nn.Module`` into a :class:`ModelSpec`.

    ``input_shape`` (per sample, e.g. ``(3, 224, 224)``) overrides the default shape of the spec
    (zoo: its dataset's shape; torchvision: ``(3, 224, 224)``; others: unknown, ``None``).

    A ``.pt``/``.pth`` path is loaded with ``torch.load(weights_only=False)``, which unpickles and can
    run code from the file: this happens only for a path the caller names explicitly, so only pass
    files you trust; a :class:`PickleWarning` says so once per file.  ``zoo:``, ``torchvision:`` and
    ``.rankslim`` load tensors only; ``module:function`` and ``file.py:function`` run code the caller named.

    Raises :class:`ModelSpecError` for unknown names, missing files and failed imports, listing
    the valid choices.
    """
    if isinstance(spec, nn.Module):
        return ModelSpec(spec, tuple(input_shape) if input_shape else None, None, None)
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelSpecError(f"a model spec must be a string or an nn.Module, got {type(spec).__name__}; "
                             + _SPEC_HELP)
    spec = os.fspath(spec)
    if spec.startswith("zoo:"):
        name = spec[4:]
        if name not in ZOO:
            raise _unknown_zoo(name)
        entry = ZOO[name]
        return ModelSpec(get_zoo_model(name), tuple(input_shape) if input_shape else entry.input_shape,
                         entry.dataset, spec)
    if spec.startswith("torchvision:"):
        return _resolve_torchvision(spec, spec[len("torchvision:"):], input_shape)
    # a file path: anything that exists, or names a model file by its suffix
    if Path(spec).expanduser().exists() or spec.endswith((".pt", ".pth", ".rankslim")):
        return _resolve_file(spec, input_shape)
    if ":" in spec:
        mod, _, fn = spec.rpartition(":")
        fn_ok = bool(fn) and all(p.isidentifier() for p in fn.split("."))
        if fn_ok and mod.endswith(".py"):
            return _resolve_callable(spec, input_shape)
        if fn_ok and mod and all(p.isidentifier() for p in mod.split(".")):
            return _resolve_callable(spec, input_shape)
    raise ModelSpecError(f"cannot resolve model spec {spec!r}; " + _SPEC_HELP)


__all__ = ["CHECKPOINT_DIR", "SAFE_SPEC_PREFIXES", "ZOO", "ZooEntry", "LeNet5", "ResNet20", "BasicBlock", "ModelSpec",
           "PickleWarning", "ViT", "ViTBlock", "lenet5", "resnet20", "vit", "get_zoo_model", "plan_base_model", "resolve_model"]

"""Declared, typed options for methods and allocators, validated before any work starts.

Every :class:`~rankslim.methods.Method` and :class:`~rankslim.allocate.Allocator` declares its options as a
tuple of :class:`Opt` (name, converter, default, help).  :func:`validate` turns what a user passed
(Python values, or strings from the CLI) into a complete dict of typed values, and refuses unknown names
(with the closest valid one) and values that do not convert, naming the owner — so a typo such as
``-M damping=1e-3`` given to ``svd`` fails at once instead of being silently ignored.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import OptionError


@dataclass(frozen=True)
class Opt:
    """One option: ``name``, ``kind`` (a converter such as :func:`float_`), ``default`` and a one-line ``help``."""

    name: str
    kind: Callable[[Any], Any]
    default: Any
    help: str

    def describe(self) -> str:
        """``name (type, default X): help`` for listings such as ``rankslim methods``."""
        return f"{self.name} ({getattr(self.kind, 'label', self.kind.__name__)}, default {self.default!r}): {self.help}"


def _parsed(value: Any) -> Any:
    """CLI strings become JSON values when they parse (``"1e-3"`` -> 0.001, ``"true"`` -> True)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _label(name: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        fn.label = name  # type: ignore[attr-defined]
        return fn
    return deco


@_label("int")
def int_(value: Any) -> int:
    """An integer (booleans and non-integral floats refused)."""
    v = _parsed(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(v)


@_label("float")
def float_(value: Any) -> float:
    """A finite real number."""
    v = _parsed(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(v)


@_label("bool")
def bool_(value: Any) -> bool:
    """``True``/``False`` (CLI: true/false/1/0/yes/no)."""
    v = _parsed(value)
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "on", "off"):
        return v.lower() in ("true", "yes", "on")
    raise ValueError(f"expected true or false, got {value!r}")


@_label("str")
def str_(value: Any) -> str:
    """Any string."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    """A converter accepting exactly one of ``choices``."""
    @_label("|".join(choices))
    def conv(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return conv


def optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``kind`` or ``None`` (CLI: ``null``/``none``)."""
    @_label(f"{getattr(kind, 'label', kind.__name__)} or none")
    def conv(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return kind(value)
    return conv


def either(kind: Callable[[Any], Any], *words: str) -> Callable[[Any], Any]:
    """``kind`` or one of the literal ``words`` (e.g. a float or ``"auto"``)."""
    @_label(f"{getattr(kind, 'label', kind.__name__)} or {'|'.join(words)}")
    def conv(value: Any) -> Any:
        if value in words:
            return value
        return kind(value)
    return conv


@_label("any JSON")
def any_(value: Any) -> Any:
    """Anything (a list, a mapping...), parsed from JSON when given as a string."""
    return _parsed(value)


def validate(spec: Sequence[Opt], given: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
    """Every option of ``spec`` with its typed value: ``given`` where passed, else the default.

    Raises :class:`OptionError` (one line) for an unknown name — with the closest valid one — or a
    value its converter refuses.  ``owner`` names what the options belong to, e.g. ``"method 'zhang'"``.
    """
    known = {o.name: o for o in spec}
    out = {o.name: o.default for o in spec}
    for key, value in (given or {}).items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(known)) or "none"
            raise OptionError(f"{owner} has no option {key!r}{hint} (its options: {valid})")
        try:
            out[key] = known[key].kind(value)
        except (ValueError, TypeError) as exc:
            raise OptionError(f"{owner} option {key}={value!r}: {exc}") from None
    return out


def describe(spec: Iterable[Opt]) -> list[str]:
    """One line per option, for help listings."""
    return [o.describe() for o in spec]


__all__ = ["Opt", "any_", "bool_", "describe", "either", "float_", "int_", "one_of", "optional", "str_", "validate"]

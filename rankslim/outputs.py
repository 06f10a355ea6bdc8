"""Output directories: written only when they are ours, one file at a time, atomically, and nothing ever deleted.

An output directory is *ours* when it holds the marker file :data:`MARKER` (JSON: tool, version, files written),
which every write puts there. A non-empty directory that is not ours is refused unless ``force``; even then only
the file names in :data:`OUR_NAMES` are written or replaced, and nothing in the directory is deleted. Each file
is written to a temporary name in the same directory and moved into place with :func:`os.replace` only after
every file of the run has been written, so a failure part-way leaves the previous outputs as they were.

Pure of the command line: the CLI (:mod:`rankslim.cli`) calls :func:`check_output_dir` before the (long)
compression, so a refusal costs nothing, and :func:`write_outputs` after it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RankslimError

#: the marker that makes a directory ours; a dot file so listings of the outputs stay clean
MARKER = ".rankslim-output"
MARKER_VERSION = 1
#: every file name rankslim writes into an output directory; nothing else there is ever touched
OUR_NAMES = frozenset({"model.rankslim", "report.json", "report.md", "model.onnx", "energy.png", "bench.json",
                       "bench.md", "config.json", "generation_config.json", MARKER})
#: where outputs go when no directory is named
DEFAULT_ROOT = Path("rankslim-out")

_FORCE_HINT = "--force (force=True in Python)"


class OutputDirError(RankslimError):
    """An output directory cannot be used: it holds someone else's files, is a file, or cannot be written."""


@dataclass
class Written:
    """What :func:`write_outputs` did: the directory, the files it wrote (marker included), and files of ours
    left from an earlier run that this run did not rewrite (never deleted, so they may be out of date)."""

    path: Path
    files: list[str]
    stale: list[str] = field(default_factory=list)


def safe_name(text: str, fallback: str = "model", max_len: int = 120) -> str:
    """``text`` as one portable file name: characters other than letters, digits, ``. _ + -`` become ``-``,
    no leading dot or dash (no hidden files, no option look-alikes), at most ``max_len`` characters."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", text)
    name = re.sub(r"-{2,}", "-", name).strip(".-")[:max_len].rstrip(".-")
    return name or fallback


def default_output_dir(model: str, method: str, budget: Mapping[str, float | None],
                       allocator: str | None = None, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """``root/<model>-<method>-<budget>``, e.g. ``rankslim-out/zoo-resnet20-svd-macs0.5``, so that runs with
    different settings do not write into one another's directory.

    ``model`` is the model spec as typed (a file path contributes only its file name); ``budget`` maps
    ``params``/``macs``/``ratio``/``energy`` to a fraction or ``None``; an explicit ``allocator`` is appended.
    """
    if "/" in model or os.sep in model:
        model = Path(model).name
    parts = [f"{k}{v:g}" for k, v in budget.items() if v is not None]
    if allocator:
        parts.append(allocator)
    label = "-".join([model, method, *parts])
    return Path(root) / safe_name(label)


def read_marker(path: str | os.PathLike) -> dict | None:
    """The parsed marker of directory ``path``, or ``None`` when it has no valid one (so it is not ours).

    A marker that is a symlink, not a regular file, unreadable or not our JSON does not count.
    """
    marker = Path(path) / MARKER
    try:
        if marker.is_symlink() or not marker.is_file():
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "rankslim" or not isinstance(data.get("version"), int):
        return None
    return data


def is_ours(path: str | os.PathLike) -> bool:
    """Whether directory ``path`` holds a valid rankslim output marker."""
    return read_marker(path) is not None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike, names: Iterable[str], force: bool = False) -> None:
    """Refuse, writing nothing, an output directory that :func:`write_outputs` must not write ``names`` into.

    Refused with :class:`OutputDirError`: an existing file (or dangling link) at ``path``; a path under a
    regular file or in a directory we cannot write; a non-empty directory without our marker unless ``force``;
    and, even with ``force``, any of ``names`` (or the marker) that exists there as a directory, a symlink or
    anything but a regular file.
    """
    p = Path(path)
    names = set(names) | {MARKER}
    unknown = names - OUR_NAMES
    if unknown:
        raise ValueError(f"not an output file name rankslim writes: {sorted(unknown)}")
    if os.path.lexists(p):
        if not p.is_dir():
            what = "a broken symlink" if p.is_symlink() else "an existing file"
            raise OutputDirError(f"output directory {p} is {what}, not a directory; choose a new or empty directory")
        try:
            entries = [e.name for e in os.scandir(p)]
        except OSError as exc:
            raise OutputDirError(f"cannot read output directory {p}: {exc.strerror or exc}") from None
        if entries and not force and not is_ours(p):
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputDirError(
                f"output directory {p} already holds files rankslim did not write ({shown}); choose a new or "
                f"empty directory, or pass {_FORCE_HINT} to write {', '.join(sorted(names - {MARKER}))} into it "
                "(nothing else there is touched or deleted)")
        for name in sorted(names):
            q = p / name
            if os.path.lexists(q) and (q.is_symlink() or not q.is_file()):
                kind = "a symlink" if q.is_symlink() else "a directory" if q.is_dir() else "not a regular file"
                raise OutputDirError(f"{q} is {kind}; rankslim only replaces regular files it wrote there: move it "
                                     "away or choose another output directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputDirError(f"output directory {p} is not writable; choose another directory")
        return
    base = _nearest_existing(p.parent if str(p.parent) else Path("."))
    if not base.is_dir():
        raise OutputDirError(f"cannot create output directory {p}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot create output directory {p}: {base} is not writable")


def _tmp_name(directory: Path, name: str) -> Path:
    # the real suffix is kept last, because some writers pick the format from it (matplotlib's savefig)
    stem, suffix = os.path.splitext(name) if not name.startswith(".") else (name, "")
    while True:
        tmp = directory / f".{stem.lstrip('.')}.{secrets.token_hex(4)}.tmp{suffix}"
        if not os.path.lexists(tmp):
            return tmp


def _default_mode(path: Path) -> None:
    """Give a written file the mode a plain ``open()`` would (some writers create 0600 temporaries)."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:
        pass


def write_outputs(path: str | os.PathLike, writers: Mapping[str, Callable[[Path], object]],
                  force: bool = False) -> Written:
    """Write one output per entry of ``writers`` (file name -> function writing that file at the path it is
    given) into directory ``path``, plus the marker, and return what was written.

    The directory is checked by :func:`check_output_dir` and created if needed. Every writer writes a temporary
    file in the directory; only when all have succeeded are they moved into place with :func:`os.replace`
    (marker first), so an exception from any writer leaves every earlier output file untouched, removes the
    temporary files, and removes the directories this call created if they are still empty. An ``OSError`` while
    writing becomes :class:`OutputDirError`; other exceptions from writers propagate unchanged.
    """
    p = Path(path)
    check_output_dir(p, writers, force)
    old = read_marker(p) if p.is_dir() else None
    created: list[Path] = []
    for d in [p, *p.parents]:
        if os.path.lexists(d):
            break
        created.append(d)
    tmps: dict[str, Path] = {}
    done = False
    try:
        try:
            p.mkdir(parents=True, exist_ok=True)
            for name, write in writers.items():
                tmps[name] = tmp = _tmp_name(p, name)
                write(tmp)
                _default_mode(tmp)
                if tmp.is_symlink() or not tmp.is_file():
                    raise OutputDirError(f"internal error: nothing was written for {p / name}; please report this")
        except OSError as exc:
            raise OutputDirError(f"cannot write to output directory {p}: {exc.strerror or exc}") from exc
        lists = [(old or {}).get(key) for key in ("files", "kept_from_earlier_runs")]
        earlier = {n for v in lists if isinstance(v, list) for n in v if isinstance(n, str)}
        stale = sorted(n for n in earlier - set(writers) - {MARKER}
                       if n in OUR_NAMES and (p / n).is_file() and not (p / n).is_symlink())
        files = sorted(set(writers) | {MARKER})
        try:
            tmps[MARKER] = _tmp_name(p, MARKER)
            tmps[MARKER].write_text(json.dumps({"tool": "rankslim", "version": MARKER_VERSION, "files": files,
                                                "kept_from_earlier_runs": stale}, indent=2) + "\n",
                                    encoding="utf-8")
            # checked again right before replacing: something may have appeared while the writers ran
            check_output_dir(p, writers, force=True)
            for name in [MARKER, *writers]:
                os.replace(tmps[name], p / name)
                del tmps[name]
        except OSError as exc:
            raise OutputDirError(f"cannot write to output directory {p}: {exc.strerror or exc}") from exc
        done = True
    finally:
        for tmp in tmps.values():
            try:
                tmp.unlink()
            except OSError:
                pass
        if not done:  # directories made by this call go again, but only while empty
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
    return Written(p, files, stale)


__all__ = ["MARKER", "OUR_NAMES", "DEFAULT_ROOT", "OutputDirError", "Written", "safe_name", "default_output_dir",
           "read_marker", "is_ours", "check_output_dir", "write_outputs"]

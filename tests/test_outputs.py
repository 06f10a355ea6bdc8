"""Output directories (rankslim.outputs): only ours are written, per-file atomic, nothing of the user's touched."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from rankslim.errors import RankslimError
from rankslim.outputs import (MARKER, OutputDirError, check_output_dir, default_output_dir, is_ours, safe_name,
                              write_outputs)


def _text(content: str):
    return lambda tmp: Path(tmp).write_text(content)


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (relative path -> bytes, "<dir>" or "-> target" for links), links not followed."""
    snap: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            key = str(p.relative_to(root))
            snap[key] = ("-> " + os.readlink(p)) if p.is_symlink() else "<dir>" if p.is_dir() else p.read_bytes()
    return snap


def test_new_directory_gets_files_and_marker_with_normal_permissions(tmp_path):
    out = tmp_path / "a" / "b"
    w = write_outputs(out, {"report.json": _text("{}"), "report.md": _text("# r\n")})
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "report.json", "report.md"])
    assert (out / "report.md").read_text() == "# r\n"
    marker = json.loads((out / MARKER).read_text())
    assert marker["tool"] == "rankslim" and set(marker["files"]) == {MARKER, "report.json", "report.md"}
    assert is_ours(out) and w.stale == []
    # temporary files are not created with mkstemp's 0600: the outputs get the mode any new file gets here
    ref = tmp_path / "ref"
    ref.write_text("x")
    assert stat.S_IMODE((out / "report.md").stat().st_mode) == stat.S_IMODE(ref.stat().st_mode)


def test_a_writer_that_creates_0600_files_still_gives_normal_permissions(tmp_path):
    def private(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # as safetensors' writer does
        os.write(fd, b"x")
        os.close(fd)
    out = tmp_path / "o"
    write_outputs(out, {"model.rankslim": private})
    ref = tmp_path / "ref"
    ref.write_text("x")
    assert stat.S_IMODE((out / "model.rankslim").stat().st_mode) == stat.S_IMODE(ref.stat().st_mode)


def test_foreign_non_empty_directory_is_refused_and_force_touches_only_our_names(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"user data\x00\xff")
    (out / "sub").mkdir()
    (out / "sub" / "model.rankslim").write_bytes(b"not ours")
    before = _snapshot(out)
    with pytest.raises(OutputDirError, match="did not write") as e:
        write_outputs(out, {"report.md": _text("new")})
    assert isinstance(e.value, RankslimError) and "\n" not in str(e.value)
    assert _snapshot(out) == before
    write_outputs(out, {"report.md": _text("new")}, force=True)
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the user's changed or removed
    assert set(after) - set(before) == {"report.md", MARKER}


def test_empty_directory_is_accepted_and_ours_is_rewritten_without_force(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_outputs(out, {"report.md": _text("one")})
    (out / "user.txt").write_text("mine")   # a user file later dropped into our directory stays untouched
    write_outputs(out, {"report.md": _text("two")})
    assert (out / "report.md").read_text() == "two" and (out / "user.txt").read_text() == "mine"


@pytest.mark.parametrize("corrupt", ["not json", '{"tool": "other", "version": 1}', "[]"])
def test_an_invalid_marker_does_not_make_a_directory_ours(tmp_path, corrupt):
    out = tmp_path / "o"
    out.mkdir()
    (out / MARKER).write_text(corrupt)
    (out / "report.md").write_text("someone's")
    assert not is_ours(out)
    with pytest.raises(OutputDirError):
        write_outputs(out, {"report.md": _text("new")})
    assert (out / "report.md").read_text() == "someone's"


def test_an_existing_file_as_directory_is_refused(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"\x80\x02 weights")
    with pytest.raises(OutputDirError, match="existing file"):
        write_outputs(f, {"report.md": _text("x")}, force=True)
    assert f.read_bytes() == b"\x80\x02 weights"
    with pytest.raises(OutputDirError, match="is a file"):
        check_output_dir(f / "sub", ["report.md"])
    assert f.read_bytes() == b"\x80\x02 weights"


@pytest.mark.parametrize("kind", ["dir", "symlink", "marker-symlink"])
def test_our_name_taken_by_a_directory_or_symlink_is_refused_even_with_force(tmp_path, kind):
    out = tmp_path / "o"
    write_outputs(out, {"report.md": _text("old")})
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    if kind == "dir":
        (out / "report.json").mkdir()
        (out / "report.json" / "inner").write_text("inner")
    elif kind == "symlink":
        (out / "report.json").symlink_to(target)
    else:
        (out / MARKER).unlink()
        (out / MARKER).symlink_to(target)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputDirError, match="symlink|directory"):
        write_outputs(out, {"report.json": _text("{}"), "report.md": _text("new")}, force=True)
    assert _snapshot(tmp_path) == before


def test_a_failing_writer_leaves_the_previous_outputs_intact(tmp_path):
    out = tmp_path / "o"
    write_outputs(out, {"model.rankslim": _text("old model"), "report.json": _text("old json"),
                        "report.md": _text("old md")})
    before = _snapshot(out)

    def boom(tmp: Path) -> None:
        Path(tmp).write_text("half written")
        raise RuntimeError("disk on fire")

    # the first file is written fine before the failure; it must not replace the old one
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_outputs(out, {"model.rankslim": _text("new model"), "report.json": boom, "report.md": _text("new md")})
    assert _snapshot(out) == before  # no temp file left either


def test_a_failed_write_into_a_new_directory_leaves_no_directory(tmp_path):
    out = tmp_path / "x" / "y"

    def boom(tmp: Path) -> None:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(OutputDirError, match="cannot write"):
        write_outputs(out, {"report.md": boom})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            check_output_dir(ro / "out", ["report.md"])
    finally:
        ro.chmod(0o700)


def test_files_of_an_earlier_run_are_kept_and_reported_stale(tmp_path):
    out = tmp_path / "o"
    write_outputs(out, {"model.onnx": _text("onnx"), "report.md": _text("1")})
    w = write_outputs(out, {"report.md": _text("2")})
    assert w.stale == ["model.onnx"] and (out / "model.onnx").read_text() == "onnx"
    assert json.loads((out / MARKER).read_text())["kept_from_earlier_runs"] == ["model.onnx"]


def test_only_our_file_names_can_be_written(tmp_path):
    with pytest.raises(ValueError):
        write_outputs(tmp_path / "o", {"../escape.txt": _text("x")})
    assert list(tmp_path.iterdir()) == []


def test_default_output_dir_is_one_safe_name_per_setting(tmp_path):
    assert default_output_dir("zoo:resnet20", "svd", {"macs": 0.5}) == Path("rankslim-out/zoo-resnet20-svd-macs0.5")
    a = default_output_dir("zoo:lenet5", "svd", {"params": 0.3, "macs": None}, root=tmp_path)
    b = default_output_dir("zoo:lenet5", "svd", {"params": 0.5}, root=tmp_path)
    c = default_output_dir("zoo:lenet5", "tucker", {"params": 0.3}, root=tmp_path)
    assert len({a, b, c}) == 3
    for spec in ("../../etc/passwd", "/abs/dir/my model.pt", "..", "torchvision:resnet18@w.pth", "-rf", "a:b\x00c"):
        d = default_output_dir(spec, "svd", {"params": 0.5}, root=tmp_path)
        assert d.parent == tmp_path, spec
        assert not d.name.startswith((".", "-")) and "/" not in d.name and "\x00" not in d.name
    assert safe_name("..") == "model" and safe_name("a b/c") == "a-b-c"

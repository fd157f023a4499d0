"""Atomic writes: a file is either the old one or the whole new one, never half of one."""

from __future__ import annotations

import os
import stat

import pytest

from catome_export.errors import CatomeError
from catome_export.fsutil import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_with


def assert_default_file_mode(path) -> None:
    """``path`` has the mode a plain ``open(path, "w")`` would give it (0o666 less the umask), not mkstemp's 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_open_moves_the_whole_file_into_place(tmp_path):
    target = tmp_path / "weights.data"
    target.write_bytes(b"old")
    with atomic_open(target) as fh:
        fh.write(b"new ")
        assert target.read_bytes() == b"old"  # nothing visible before the block ends
        fh.write(b"contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.data"]
    assert_default_file_mode(target)


def test_atomic_open_leaves_the_old_file_and_no_temp_file_on_error(tmp_path):
    target = tmp_path / "weights.data"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.data"]


def test_atomic_write_bytes(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"


def test_atomic_write_with_a_writer_that_takes_a_file_name(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")

    assert atomic_write_with(target, write) == target
    assert target.read_bytes() == b"new" and not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    assert_default_file_mode(target)


def test_atomic_write_with_keeps_the_old_file_and_names_the_path_on_errors(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(CatomeError, match="cannot write .*plot.png: .*No space left"):
        atomic_write_with(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    with pytest.raises(CatomeError, match="does not exist; create it first"):
        atomic_write_with(tmp_path / "missing" / "plot.png", lambda tmp: tmp.write_bytes(b"x"))


def test_atomic_write_json_strict_refuses_nan(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": float("nan")})
    assert "NaN" in (tmp_path / "a.json").read_text()
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "b.json", {"x": float("nan")}, allow_nan=False)
    assert not (tmp_path / "b.json").exists()

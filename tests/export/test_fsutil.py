"""Atomic writes: a file is either the old one or the whole new one, never half of one."""

from __future__ import annotations

import os
import stat

import pytest

from catome_export.export.fsutil import atomic_open, atomic_write_bytes


def test_atomic_open_moves_the_whole_file_into_place(tmp_path):
    target = tmp_path / "weights.data"
    target.write_bytes(b"old")
    with atomic_open(target) as fh:
        fh.write(b"new ")
        assert target.read_bytes() == b"old"  # nothing visible before the block ends
        fh.write(b"contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.data"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


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

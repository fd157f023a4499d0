"""The host memory floor checks (catome_export.memory)."""

from __future__ import annotations

import pytest

from catome_export import memory
from catome_export.errors import CatomeError

MEMINFO = """MemTotal:       24608356 kB
MemFree:         1180844 kB
MemAvailable:   12000000 kB
Buffers:           10240 kB
"""


def test_available_bytes_reads_memavailable(tmp_path, monkeypatch):
    info = tmp_path / "meminfo"
    info.write_text(MEMINFO)
    monkeypatch.setattr(memory, "MEMINFO", info)
    assert memory.available_bytes() == 12_000_000 * 1024
    info.write_text("MemTotal: 1 kB\n")
    assert memory.available_bytes() is None
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")
    assert memory.available_bytes() is None


def test_check_available_counts_what_the_process_will_free(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 10**9)
    memory.check_available(8 * 10**9, "work", "fix")  # 8 GB + the 1 GiB margin fit in 10 GB
    with pytest.raises(CatomeError, match=r"^work needs at least 10\.1 GB of memory, and this machine has 10\.0 GB "
                                          r"available: fix$"):
        memory.check_available(9 * 10**9, "work", "fix")
    memory.check_available(9 * 10**9, "work", "fix", held=2 * 10**9)  # freed before the work starts
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    memory.check_available(10**15, "work", "fix")  # unknown: no check


def test_verify_need_is_the_eager_unet_and_the_engine():
    assert memory.verify_need(10**9) == int(10**9 * (1 + memory.ORT_CPU_ENGINE_FACTOR)) == 2_500_000_000

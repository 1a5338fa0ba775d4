"""gradwatch.core.memory: the host's available RAM, read without any framework."""

from __future__ import annotations

from gradwatch.core.memory import available_ram


def test_mem_available_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000 kB\nMemFree:  100 kB\nMemAvailable:  2048 kB\n")
    assert available_ram(str(meminfo)) == 2048 * 1024


def test_without_meminfo_the_os_free_pages_or_none(tmp_path):
    n = available_ram(str(tmp_path / "missing"))
    assert n is None or n > 0

"""The process's host-memory habits (`lunar_lens.core.host_memory`): freed heap memory goes back to the system,
oneDNN's primitive cache is off unless the user set it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lunar_lens.core import host_memory
from lunar_lens.core.progress import Stages


def anon_mb() -> float:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssAnon")) / 1024


def test_economise_turns_off_the_onednn_cache_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    host_memory.economise()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    host_memory.economise()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"


@pytest.mark.skipif(host_memory._glibc() is None, reason="malloc_trim is glibc's")
def test_a_finished_stage_gives_freed_heap_memory_back():
    blocks = [bytearray(64 * 1024) for _ in range(2048)]  # 128 MiB in heap-sized blocks
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # resident
    del blocks[::2]  # 64 MiB freed between live blocks: the heap cannot shrink from its top
    before = anon_mb()
    with Stages(report=False)("a stage"):
        pass
    assert before - anon_mb() > 32

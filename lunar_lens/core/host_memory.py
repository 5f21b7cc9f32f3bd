"""Host-memory habits of a lunar-lens process (experiments/bench_memory.py measures their effect). On the CPU,
memory a stage has freed would otherwise stay with the process and add to the next stage's peak:

- glibc keeps freed blocks below its mmap threshold in the heap, and raises that threshold each time a larger
  block is freed (16 MiB file reads, activations), so later temporaries pile up in a heap it rarely gives back;
- oneDNN (half-precision matmuls on the CPU) caches a compiled primitive, with its buffers, for every input
  shape it meets: the refinement's row-by-row passes meet many.

`economise()` fixes the threshold at 1 MiB (larger blocks are mapped and returned when freed) and turns off
oneDNN's primitive cache unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set (a 170M bf16 `unlearn` on the CPU took 8 %
longer and 52 MB less; set the variable to 1024, oneDNN's default, for speed). `release_freed()` hands
freed heap memory back (`Stages` calls it when a stage ends). The command line calls `economise()` first; a
library user may. Elsewhere than on Linux with glibc only the oneDNN setting applies.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

MMAP_THRESHOLD_BYTES = 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def economise() -> None:
    """A fixed 1 MiB mmap threshold (glibc) and no oneDNN primitive cache (unless the variable is set); call
    before the first half-precision pass on the CPU (oneDNN reads its variable once)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_freed() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; well under a millisecond). No
    `gc.collect()`: it took 0.3 s with a model loaded and freed nothing measurable (tensors go by reference count)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

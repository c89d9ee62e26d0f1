"""Process memory: peak resident memory per stage, and glibc malloc settings scoped to a fit.

Linux only where it says so; elsewhere the functions fall back to `resource` or do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource
from collections.abc import Iterator
from pathlib import Path

# glibc's malloc.h: mallopt parameters and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _status_kb(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak() -> bool:
    """Start a new peak-resident-memory window (Linux: writing 5 to /proc/self/clear_refs resets
    VmHWM). False where it cannot: `peak_gb` then reports the process's peak so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_gb() -> float:
    """Peak resident memory (GB, 10^9 bytes) since the last `reset_peak`, else of the process."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return round(kb / 1e6, 2)


def process_peak_gb() -> float:
    """Peak resident memory (GB) of the whole process so far (what `/usr/bin/time -v` reports)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


def _mallopt():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim). A no-op elsewhere."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """While inside: glibc's malloc keeps freed memory for reuse instead of returning it.

    A CPU training step allocates and frees several buffers of 100+ MB (the logits of the
    response tokens, their gradient, the dense gradient of a 49k x 576 embedding). By default
    glibc serves each from a fresh mmap and unmaps it on free, so every step pays the page faults
    of touching new memory again: about 15% of a SmolLM2 SFT step here (benchmarks/README.md).
    On exit the defaults come back and the kept memory is returned (malloc_trim), so the setting
    never holds one stage's peak into the next. Yields False where the C library is not glibc.
    """
    mallopt = _mallopt()
    changed = bool(mallopt) and bool(mallopt(M_MMAP_MAX, 0)) and bool(
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
    )
    try:
        yield changed
    finally:
        if mallopt:
            mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        release_freed_memory()

"""Process memory: peak resident memory per stage, and returning freed heap memory.

Linux only where it says so; elsewhere the functions fall back to `resource` or do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import resource
from pathlib import Path


def _status_kb(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_gb() -> float:
    """Resident memory now (GB), 0.0 where /proc is not there."""
    return round((_status_kb("VmRSS") or 0) / 1e6, 2)


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


@functools.cache
def _libc():
    """The C library, looked up once (find_library runs ldconfig: not for every step)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere).

    A training step frees hundreds of MB of activations of varied sizes; glibc keeps much of it
    fragmented in its heap, so without a trim a process's resident memory creeps up step by step
    (SmolLM2 SFT on a CPU: from 2.6 GB to 4.5 GB over 16 steps, benchmarks/README.md). Trimming
    after each optimiser step costs ~0.15 s there and keeps every step starting from the same
    footprint."""
    with contextlib.suppress(AttributeError):  # not glibc: no malloc_trim
        _libc().malloc_trim(0)


_trimmed_at = 0.0  # resident GB after the last trim_heap_if_grown


def trim_heap_if_grown(by_gb: float = 0.25) -> None:
    """trim_heap, when resident memory has grown by `by_gb` since the last trim here (the
    training stages call this after every step: a tiny model never pays for the trim)."""
    global _trimmed_at
    if rss_gb() - _trimmed_at >= by_gb:
        trim_heap()
        _trimmed_at = rss_gb()


def release_freed_memory() -> None:
    """Collect unreachable Python objects (reference cycles holding tensors), then trim."""
    gc.collect()
    trim_heap()

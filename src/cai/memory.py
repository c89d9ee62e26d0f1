"""Process memory: peak resident memory per stage, and returning freed heap memory.

Linux only where it says so; elsewhere the functions fall back to `resource` or do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import pickle
import resource
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


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
    VmHWM). False where it cannot: `peak_gb` then reports the process's peak so far.

    For benchmarks within one process only: the reset also resets what getrusage and
    `/usr/bin/time -v` report for the process (the pipeline measures a stage in its own process
    instead, `in_child_process`)."""
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


WIDTH_MULTIPLE = 32  # tokens; see padded_width


def padded_width(length: int, multiple: int = WIDTH_MULTIPLE) -> int:
    """`length` rounded up to a multiple of `multiple`: the width to pad a batch to.

    On a CPU, torch's bf16 matrix products run through oneDNN, which builds and keeps a kernel
    (and its buffers) for every new shape. Batches trimmed to their longest row have a new
    width almost every step, so a training stage's resident memory grew by ~30 MB a step (the
    judge: from 2.3 GB after its first step to 4.2 GB by its 48th) and each new shape cost
    build time. Widths from a small set keep memory flat; the extra padding (right padding, a
    causal mask: no real token attends to it) costs less than the kernel builds it saves
    (benchmarks/README.md, "make run on a laptop")."""
    return -(-int(length) // multiple) * multiple


class StageProcessError(RuntimeError):
    """A stage process ended without a result (killed, e.g. by the kernel's out-of-memory
    killer), or raised an error that cannot be sent back as it is."""


def fork_available() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def in_child_process(fn: Callable[[], T]) -> tuple[T, float]:
    """Run `fn()` in a forked copy of this process and return (its result, the child's peak
    resident memory in GB). Whatever the call allocates (weights, optimiser state, allocator
    fragmentation, library caches) goes back to the system when the child exits, so the next
    call starts from this process's footprint, and the child's peak is that call's own
    (/proc VmHWM; `/usr/bin/time -v` sees the largest child). An error raised by `fn` is raised
    here; a child that dies without answering is an error naming the signal.

    The caller must not have started torch's thread pools (fork copies one thread only): the
    pipeline runs every stage in a child and no tensor work in the parent."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, answer through the pipe, leave without the parent's atexit
        os.close(read_end)
        status = 0
        try:
            try:
                answer = ("ok", fn())
            except BaseException as error:  # noqa: BLE001 - every error goes to the parent
                status = 1
                answer = ("error", error, traceback.format_exc())
            peak = peak_gb()  # this child's own high-water mark
            try:
                data = pickle.dumps((*answer, peak))
            except Exception:  # an unpicklable result or error: its text instead
                text = answer[2] if answer[0] == "error" else "unpicklable result"
                data = pickle.dumps(("error", StageProcessError(text), text, peak))
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer_pipe:
        data = answer_pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    if not data:
        code = os.waitstatus_to_exitcode(wait_status)
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise StageProcessError(
            f"The stage process {pid} ended without a result ({reason}; SIGKILL is often the "
            "out-of-memory killer: see the stage's peak memory in earlier runs, lower its batch "
            "or micro-batch settings, or set pipeline.isolate_stages=false to see the error)."
        )
    kind, *rest = pickle.loads(data)
    if kind == "error":
        error, text, _ = rest
        if hasattr(error, "add_note"):  # Python >= 3.11: the child's traceback in the report
            error.add_note("In the stage process:\n" + text)
        raise error
    result, peak = rest
    return result, peak

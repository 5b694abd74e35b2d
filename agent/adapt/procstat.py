"""The monitor's reading of this process's own resident memory, on its own: the model
manager measures what each variant adds when it loads, without a full snapshot. And the
calls that hand memory back: the C heap's free pages after a variant is closed, the clean
file pages only start-up touched once the agent is ready."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / (1024 * 1024) if hasattr(os, "sysconf") else 4096 / 2**20


def process_rss_mb() -> float | None:
    """This process's resident set in MiB (from /proc/self/statm), None where unreadable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * _PAGE_MB
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, None on another C library (musl has none) or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


def return_free_memory() -> bool:
    """Give the pages free in the C heap back to the system (glibc `malloc_trim(0)`);
    False where there is no such call.

    glibc keeps what a closed onnxruntime session freed for later allocations instead of
    returning it: measured here, 200 load/close cycles of an 8 MB CNN left the process
    about 45 MB above where one trim per close leaves it (README, "Memory that comes back").
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_MADV_DONTNEED = 4  # <sys/mman.h>, the same number on every Linux architecture


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """The C library's madvise, None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    advise: Callable[[int, int, int], int] = function
    return advise


def release_file_pages() -> float:
    """Unmap from this process the resident pages of its read-only file mappings (the code
    and constants of Python, numpy, onnxruntime and the rest); the MiB of RSS released.

    Start-up runs code that serving never runs again: importing the libraries, registering
    onnxruntime's kernels (8 MB of its library for one small model), building the pydantic
    validators. Those pages are clean copies of files that stay in the page cache, so this
    is what the kernel's reclaim does to them under memory pressure, done at once: the next
    touch of a page still needed maps it back from the cache (a minor fault, no disk read
    while the cache holds it). Only mappings that are private, not writable and hold no
    page of their own (Anonymous: 0 kB) are touched: a relocated page of a library's
    read-only data lives only in this process and must stay.
    """
    advise = _madvise()
    if advise is None:
        return 0.0
    before = process_rss_mb()
    try:
        with open("/proc/self/smaps", "rb") as f:
            spans = _clean_file_spans(f.read())
    except OSError:
        return 0.0
    for start, end in spans:
        advise(start, end - start, _MADV_DONTNEED)
    after = process_rss_mb()
    return max(0.0, before - after) if before is not None and after is not None else 0.0


def process_anon_mb() -> float | None:
    """This process's resident anonymous memory in MiB (RssAnon in /proc/self/status: heap,
    stacks, private copies), None where unreadable.

    What a model load really adds (its weights and buffers), whether or not the libraries'
    code the load runs was resident before: the RSS would also count that code when a load
    faults it back in after start-up released it (about 13 MB for a second small CNN), and
    a lighter variant could then measure heavier than the one it replaces.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, IndexError, ValueError):
        return None
    return None


def _clean_file_spans(smaps: bytes) -> list[tuple[int, int]]:
    """The (start, end) of each private read-only file mapping without anonymous pages."""
    spans: list[tuple[int, int]] = []
    candidate: tuple[int, int] | None = None
    for line in smaps.splitlines():
        if line.startswith(b"Anonymous:"):
            if candidate is not None and line.split()[1] == b"0":
                spans.append(candidate)
            candidate = None
        elif b"-" in line[:17] and not line[:1].isupper():
            fields = line.split(None, 5)
            candidate = None
            if _read_only_private_file(fields[1], fields[5] if len(fields) > 5 else b""):
                low, high = fields[0].split(b"-")
                candidate = (int(low, 16), int(high, 16))
    return spans


def _read_only_private_file(perms: bytes, path: bytes) -> bool:
    # perms is "r-xp": not writable, private; a path, not [heap], [stack] or [vdso].
    return (
        perms[1:2] != b"w"
        and perms[3:4] == b"p"
        and path.startswith(b"/")
        and not path.endswith(b"(deleted)")
    )

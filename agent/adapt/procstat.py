"""The monitor's reading of this process's own resident memory, on its own: the model
manager measures what each variant adds when it loads, without a full snapshot."""

from __future__ import annotations

import os

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / (1024 * 1024) if hasattr(os, "sysconf") else 4096 / 2**20


def process_rss_mb() -> float | None:
    """This process's resident set in MiB (from /proc/self/statm), None where unreadable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * _PAGE_MB
    except (OSError, IndexError, ValueError):
        return None

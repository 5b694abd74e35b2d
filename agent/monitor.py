"""Resource sampling: the only module that reads psutil and the cgroup files.

A `ResourceSnapshot` is plain data, so that everything downstream (metrics now, the swap
policy later) can be fed recorded or synthetic snapshots in tests.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

MIB = 1024 * 1024


@dataclass(frozen=True)
class ResourceSnapshot:
    """The board and the agent process at one moment."""

    monotonic: float
    system_cpu_percent: float
    memory_available_mb: float
    memory_total_mb: float
    process_rss_mb: float
    process_cpu_percent: float
    cgroup_memory_max_mb: float | None
    cgroup_memory_current_mb: float | None
    cpu_temperature_c: float | None

    def as_dict(self) -> dict[str, Any]:
        figures = asdict(self)
        del figures["monotonic"]
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}


def process_rss_mb() -> float:
    """The agent's resident memory now, in MiB: runtimes take it before and after a load to
    measure what one variant costs (RSS deltas are what the policy compares with memory left).
    """
    return float(psutil.Process(os.getpid()).memory_info().rss) / MIB


class ResourceMonitor:
    """Samples psutil; CPU percentages are over the time since the previous sample."""

    def __init__(self, cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
        self._process = psutil.Process(os.getpid())
        self._cgroup = _own_cgroup(cgroup_root)
        # The first cpu_percent() call only starts the measurement.
        psutil.cpu_percent(interval=None)
        self._process.cpu_percent(interval=None)

    def sample(self) -> ResourceSnapshot:
        memory = psutil.virtual_memory()
        return ResourceSnapshot(
            monotonic=time.monotonic(),
            system_cpu_percent=psutil.cpu_percent(interval=None),
            memory_available_mb=memory.available / MIB,
            memory_total_mb=memory.total / MIB,
            process_rss_mb=self._process.memory_info().rss / MIB,
            process_cpu_percent=self._process.cpu_percent(interval=None),
            cgroup_memory_max_mb=_read_mb(self._cgroup, "memory.max"),
            cgroup_memory_current_mb=_read_mb(self._cgroup, "memory.current"),
            cpu_temperature_c=_cpu_temperature(),
        )


def _own_cgroup(root: Path) -> Path | None:
    """This process's cgroup v2 directory, when the unified hierarchy is mounted."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                path = root / line[3:].lstrip("/")
                return path if (path / "cgroup.controllers").exists() else None
    except OSError:
        pass  # not Linux, or /proc hidden: no cgroup figures
    return None


def _read_mb(cgroup: Path | None, name: str) -> float | None:
    if cgroup is None:
        return None
    try:
        value = (cgroup / name).read_text().strip()
    except OSError:
        return None
    return None if value == "max" else int(value) / MIB


def _cpu_temperature() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    # Boards name their CPU sensor differently; take the hottest of the known ones.
    for name in ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "cpu-thermal", "acpitz"):
        readings = [t.current for t in sensors.get(name, []) if t.current is not None]
        if readings:
            return float(max(readings))
    return None

"""What the monitor reports: immutable snapshots of the board and the agent process.

Plain data, so that the policy can be fed recorded or synthetic histories in tests. Every
figure the board cannot report is None; the policy then ignores that signal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ResourceSnapshot:
    """The board and the agent process at one moment (CPU figures: since the last sample)."""

    monotonic: float
    system_cpu_percent: float
    """All CPUs busy, 0-100."""
    process_cpu_percent: float
    """This process, in percent of one CPU (may exceed 100 on several cores)."""
    cpu_count: int
    memory_available_mb: float
    memory_total_mb: float
    process_rss_mb: float
    psi_cpu_some_avg10: float | None = None
    psi_cpu_full_avg10: float | None = None
    psi_memory_some_avg10: float | None = None
    psi_memory_full_avg10: float | None = None
    cgroup_cpu_quota_cores: float | None = None
    """CPUQuota= as cores (quota / period); None without a quota."""
    cgroup_cpu_throttled_ratio: float | None = None
    """Share of CFS periods throttled since the previous sample, 0-1."""
    cgroup_memory_max_mb: float | None = None
    cgroup_memory_current_mb: float | None = None
    """The cgroup's usage less its inactive page cache (which the kernel drops before it
    fails a charge): what counts against cgroup_memory_max_mb."""
    cgroup_memory_events: int | None = None
    """memory.events high+max+oom (v2) or failcnt (v1) since the previous sample."""
    cpu_temperature_c: float | None = None
    cpu_temperature_max_c: float | None = None
    """The sensor's high/critical trip point when it reports one."""
    cpu_freq_mhz: float | None = None
    cpu_freq_max_mhz: float | None = None
    cgroup_memory_cache_mb: float | None = None
    """Inactive page cache charged to the cgroup, left out of cgroup_memory_current_mb."""

    @property
    def memory_headroom_mb(self) -> float:
        """Memory this process can still take: the system's available memory, capped by
        what is left under the cgroup limit when there is one."""
        if self.cgroup_memory_max_mb is not None and self.cgroup_memory_current_mb is not None:
            left = self.cgroup_memory_max_mb - self.cgroup_memory_current_mb
            return max(0.0, min(self.memory_available_mb, left))
        return self.memory_available_mb

    def as_dict(self) -> dict[str, Any]:
        figures = asdict(self)
        del figures["monotonic"]
        figures["memory_headroom_mb"] = self.memory_headroom_mb
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}

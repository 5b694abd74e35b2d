"""The resource monitor: the only module of the agent that reads psutil, /proc and /sys.

`ResourceMonitor.sample()` turns the board, the agent's cgroups and the agent process into one
`ResourceSnapshot`; `ResourceSampler` samples any `SnapshotSource` (the monitor, or a scripted
`FakeSource` in tests) on its own thread into a bounded `SnapshotHistory`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from agent.adapt.snapshot import ResourceSnapshot
from agent.errors import ConfigError

# psutil is imported where it is read, not with this module: `edge-agent run` needs
# usable_cpus() (affinity and cgroup files) before it loads its models, and psutil (its
# import costs a tenth of the time to the first answer) only once it serves and samples.
if TYPE_CHECKING:
    import psutil

log = structlog.get_logger(__name__)

MIB = 1024 * 1024
# cgroup v1 reports "no limit" as the largest page-aligned counter (9223372036854771712 with
# 4 KiB pages); anything this large is no limit on any real board.
V1_UNLIMITED_BYTES = 1 << 60
# Sensor names boards give their CPU or SoC temperature, best first.
CPU_SENSORS = (
    "cpu_thermal",
    "cpu-thermal",
    "cpu0_thermal",
    "soc_thermal",
    "soc-thermal",
    "coretemp",
    "k10temp",
    "zenpower",
    "acpitz",
)

USAGE_V1, USAGE_V2 = "memory.usage_in_bytes", "memory.current"
# Boards without a CPU sensor (VMs, some SoCs) are looked at again this rarely: psutil's
# scan of hwmon and thermal zones is the dearest part of a sample.
SENSOR_RECHECK_S = 60.0

T = TypeVar("T")


class SnapshotSource(Protocol):
    """Anything that can be asked for the board's state now."""

    def sample(self) -> ResourceSnapshot: ...


# --- parsing: pure functions of a file's text --------------------------------------------------


def parse_psi(text: str) -> dict[str, float]:
    """`/proc/pressure/*`: {"some": avg10, "full": avg10} for the lines present."""
    figures: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for field in rest.split():
            key, _, value = field.partition("=")
            if key == "avg10":
                figures[kind] = float(value)
    return figures


def parse_keyed(text: str) -> dict[str, int]:
    """Flat-keyed cgroup files (`cpu.stat`, `memory.events`, `memory.stat`): "key value" lines."""
    figures: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                figures[parts[0]] = int(parts[1])
            except ValueError:
                continue  # a key with a non-integer value is not one we read
    return figures


def keyed_value(text: str, key: str) -> int | None:
    """One key of a flat-keyed file, without parsing the other lines (memory.stat is long)."""
    needle = key + " "
    if text.startswith(needle):
        start = len(needle)
    else:
        at = text.find("\n" + needle)
        if at < 0:
            return None
        start = at + 1 + len(needle)
    end = text.find("\n", start)
    try:
        return int(text[start : end if end >= 0 else None])
    except ValueError:
        return None


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("max 100000" or "20000 100000") as cores; None without a quota."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max":
        return None
    return int(quota) / int(period or "100000")


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us` as cores; -1 means no quota."""
    quota = int(quota_text.strip())
    if quota < 0:
        return None
    return quota / int(period_text.strip())


def parse_memory_limit(text: str) -> int | None:
    """`memory.max` (v2, "max" = none) or `memory.limit_in_bytes` (v1, huge = none) in bytes."""
    value = text.strip()
    if value == "max":
        return None
    limit = int(value)
    return None if limit >= V1_UNLIMITED_BYTES else limit


@dataclass(frozen=True, slots=True)
class CgroupMembership:
    """`/proc/self/cgroup`: the v2 path (the `0::` line) and each v1 controller's path."""

    v2: str | None
    v1: dict[str, str]


def parse_proc_cgroup(text: str) -> CgroupMembership:
    """`/proc/<pid>/cgroup` lines are "id:controllers:path"; v2 has id 0 and no controllers."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2 = path
        else:
            for controller in controllers.split(","):
                v1[controller] = path
    return CgroupMembership(v2=v2, v1=v1)


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """One cgroup mount from `/proc/self/mountinfo`."""

    version: int
    root: str
    """The hierarchy's path shown at the mount point ("/" unless a subtree is bind-mounted)."""
    mountpoint: Path
    controllers: frozenset[str]
    """v1: the controllers of that hierarchy (cpu, cpuacct, memory...); v2: empty."""


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts of `/proc/self/mountinfo`, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if len(fields) < dash + 4 or dash < 5:
            continue
        fstype, super_options = fields[dash + 1], fields[dash + 3]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        root, mountpoint = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup2":
            mounts.append(CgroupMount(2, root, mountpoint, frozenset()))
        else:
            # The superblock options name the hierarchy's controllers among rw, name=... etc.
            options = frozenset(super_options.split(","))
            mounts.append(CgroupMount(1, root, mountpoint, options))
    return mounts


@dataclass(frozen=True, slots=True)
class CgroupChain:
    """A process's cgroup in one hierarchy and its ancestors, leaf first, as directories,
    up to the mount point. That one is read too: in a cgroup namespace (a container) it is
    the container's own cgroup, with its limits; the real root has no limit files (v2) or
    reads "unlimited" (v1)."""

    version: int
    dirs: tuple[str, ...]


def _chain(mount: CgroupMount, path: str) -> CgroupChain | None:
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None  # this mount shows another part of the hierarchy
    parts = [p for p in path[len(root) :].split("/") if p]
    dirs = [str(mount.mountpoint.joinpath(*parts[:n])) for n in range(len(parts), -1, -1)]
    return CgroupChain(mount.version, tuple(dirs))


def cgroup_chain(
    controller: str, membership: CgroupMembership, mounts: list[CgroupMount]
) -> CgroupChain | None:
    """Where to read `controller` for this process: its v1 hierarchy when the controller is
    mounted as v1 (hybrid systems), else the unified v2 hierarchy; None when neither is."""
    if controller in membership.v1:
        for mount in mounts:
            if mount.version == 1 and controller in mount.controllers:
                found = _chain(mount, membership.v1[controller])
                if found is not None:
                    return found
        return None
    if membership.v2 is not None:
        for mount in mounts:
            if mount.version == 2:
                found = _chain(mount, membership.v2)
                if found is not None:
                    return found
    return None


# --- the real source ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CpuLimit:
    cores: float | None
    throttled_ratio: float | None


@dataclass(frozen=True, slots=True)
class _MemoryLimit:
    max_mb: float | None
    current_mb: float | None
    cache_mb: float | None
    events: int | None


class ResourceMonitor:
    """Samples the board, the agent's cgroups and the agent process; never raises.

    CPU percentages, throttling and memory events are over the time since the previous
    sample (the first sample reports 0 % CPU and None for the others). A figure that cannot
    be read is None (or, for the figures every board has, the last value read)."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        # Plain strings: pathlib's joins cost more than the reads of these small files.
        self._proc = str(proc_root)
        self._process: psutil.Process | None = None
        self._warned: set[str] = set()
        self._no_sensor_until = 0.0
        self._last: ResourceSnapshot | None = None
        self._previous_t: float | None = None
        self._previous_system: tuple[float, float] | None = None  # (busy, total) seconds
        self._previous_process: float | None = None  # user + system seconds
        self._membership_text: str | None = None
        self._cpu_chain: CgroupChain | None = None
        self._memory_chain: CgroupChain | None = None
        self._previous_throttling: tuple[str, int, int] | None = None  # dir, periods, throttled
        self._previous_memory_events: tuple[str, int] | None = None

    def sample(self) -> ResourceSnapshot:
        """The board now."""
        now = time.monotonic()
        elapsed = None if self._previous_t is None else now - self._previous_t
        self._previous_t = now
        last = self._last
        import psutil  # noqa: PLC0415  (where it is read: see the top)

        memory = self._guard("memory", psutil.virtual_memory, None)
        self._guard("cgroups", self._refresh_cgroups, None)
        no_psi: dict[str, float] = {}
        psi_cpu = self._guard("psi_cpu", lambda: self._psi("cpu"), no_psi)
        psi_memory = self._guard("psi_memory", lambda: self._psi("memory"), no_psi)
        cpu_limit = self._guard("cgroup_cpu", self._cpu_limit, _CpuLimit(None, None))
        memory_limit = self._guard(
            "cgroup_memory", self._memory_limit, _MemoryLimit(None, None, None, None)
        )
        unknown: tuple[float | None, float | None] = (None, None)
        temperature = unknown
        if now >= self._no_sensor_until:
            temperature = self._guard("temperature", _cpu_temperature, unknown)
            if temperature[0] is None:
                self._no_sensor_until = now + SENSOR_RECHECK_S
        frequency = self._guard("frequency", _cpu_frequency, unknown)
        snapshot = ResourceSnapshot(
            monotonic=now,
            system_cpu_percent=self._guard(
                "system_cpu", self._system_cpu, last.system_cpu_percent if last else 0.0
            ),
            process_cpu_percent=self._guard(
                "process_cpu",
                lambda: self._process_cpu(elapsed),
                last.process_cpu_percent if last else 0.0,
            ),
            cpu_count=self._guard("cpu_count", _usable_cpus, last.cpu_count if last else 1),
            memory_available_mb=(
                memory.available / MIB if memory else last.memory_available_mb if last else 0.0
            ),
            memory_total_mb=memory.total / MIB if memory else last.memory_total_mb if last else 0.0,
            process_rss_mb=self._guard(
                "process_rss", self._process_rss, last.process_rss_mb if last else 0.0
            ),
            psi_cpu_some_avg10=psi_cpu.get("some"),
            psi_cpu_full_avg10=psi_cpu.get("full"),
            psi_memory_some_avg10=psi_memory.get("some"),
            psi_memory_full_avg10=psi_memory.get("full"),
            cgroup_cpu_quota_cores=cpu_limit.cores,
            cgroup_cpu_throttled_ratio=cpu_limit.throttled_ratio,
            cgroup_memory_max_mb=memory_limit.max_mb,
            cgroup_memory_current_mb=memory_limit.current_mb,
            cgroup_memory_cache_mb=memory_limit.cache_mb,
            cgroup_memory_events=memory_limit.events,
            cpu_temperature_c=temperature[0],
            cpu_temperature_max_c=temperature[1],
            cpu_freq_mhz=frequency[0],
            cpu_freq_max_mhz=frequency[1],
        )
        self._last = snapshot
        return snapshot

    def cpu_quota_cores(self) -> float | None:
        """The tightest cgroup CPU quota on the way to the root, in cores (None: none), read
        on its own: a whole sample costs more (psutil, sensors) and is not needed for it."""
        self._guard("cgroups", self._refresh_cgroups, None)
        return self._guard("cgroup_cpu", self._cpu_limit, _CpuLimit(None, None)).cores

    def _guard(self, figure: str, read: Callable[[], T], default: T) -> T:
        """One figure's read; a failure gives `default` and is logged once per figure."""
        try:
            return read()
        except Exception:  # a figure the board cannot give must not cost the others
            if figure not in self._warned:
                self._warned.add(figure)
                log.warning("monitor_read_failed", figure=figure, exc_info=True)
            return default

    def _own_process(self) -> psutil.Process:
        import psutil  # noqa: PLC0415  (where it is read: see the top)

        if self._process is None or self._process.pid != os.getpid():
            self._process = psutil.Process(os.getpid())
        return self._process

    def _system_cpu(self) -> float:
        import psutil  # noqa: PLC0415  (where it is read: see the top)

        times = psutil.cpu_times()
        # Same accounting as psutil.cpu_percent, but with this monitor's own baseline: that
        # function keeps one module-wide baseline that any other caller would move.
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        busy = total - times.idle - getattr(times, "iowait", 0.0)
        previous, self._previous_system = self._previous_system, (busy, total)
        if previous is None or total <= previous[1]:
            return 0.0
        return min(100.0, max(0.0, 100.0 * (busy - previous[0]) / (total - previous[1])))

    def _process_cpu(self, elapsed: float | None) -> float:
        times = self._own_process().cpu_times()
        used = times.user + times.system
        previous, self._previous_process = self._previous_process, used
        if previous is None or not elapsed:
            return 0.0
        return max(0.0, 100.0 * (used - previous) / elapsed)

    def _process_rss(self) -> float:
        return float(self._own_process().memory_info().rss) / MIB

    def _psi(self, resource: str) -> dict[str, float]:
        text = _read(f"{self._proc}/pressure/{resource}")
        return {} if text is None else parse_psi(text)

    def _refresh_cgroups(self) -> None:
        """Find this process's cgroups again when it moved (someone wrote its PID into
        another cgroup's `cgroup.procs`); the mounts are read only then too."""
        text = _read(f"{self._proc}/self/cgroup")
        if text == self._membership_text:
            return
        self._membership_text = text
        self._cpu_chain = self._memory_chain = None
        if text is None:
            return
        membership = parse_proc_cgroup(text)
        mounts = parse_mountinfo(_read(f"{self._proc}/self/mountinfo") or "")
        self._cpu_chain = cgroup_chain("cpu", membership, mounts)
        self._memory_chain = cgroup_chain("memory", membership, mounts)

    def _cpu_limit(self) -> _CpuLimit:
        chain = self._cpu_chain
        if chain is None:
            return _CpuLimit(None, None)
        # The tightest quota on the way to the root is the one that throttles this process;
        # its own cpu.stat counts the periods it throttled.
        tightest: tuple[float, str] | None = None
        for directory in chain.dirs:
            cores = _quota_cores(chain.version, directory)
            if cores is not None and (tightest is None or cores < tightest[0]):
                tightest = (cores, directory)
        if tightest is None:
            self._previous_throttling = None
            return _CpuLimit(None, None)
        cores, directory = tightest
        stat_text = _read(f"{directory}/cpu.stat")
        stat = parse_keyed(stat_text) if stat_text is not None else {}
        if "nr_periods" not in stat or "nr_throttled" not in stat:
            self._previous_throttling = None
            return _CpuLimit(cores, None)
        current = (directory, stat["nr_periods"], stat["nr_throttled"])
        previous, self._previous_throttling = self._previous_throttling, current
        if previous is None or previous[0] != directory:
            return _CpuLimit(cores, None)
        periods = current[1] - previous[1]
        throttled = current[2] - previous[2]
        ratio = 0.0 if periods <= 0 else min(1.0, max(0.0, throttled / periods))
        return _CpuLimit(cores, ratio)

    def _memory_limit(self) -> _MemoryLimit:
        chain = self._memory_chain
        if chain is None or not chain.dirs:
            return _MemoryLimit(None, None, None, None)
        v1 = chain.version == 1
        limit_file = "memory.limit_in_bytes" if v1 else "memory.max"
        # The cgroup with the least room under its limit on the way to the root is the one
        # whose limit this process meets first.
        chosen: tuple[float, str, int | None, int, int] | None = None
        for directory in chain.dirs:
            text = _read(f"{directory}/{limit_file}")
            limit = parse_memory_limit(text) if text is not None else None
            if limit is None:
                continue
            usage, cache = _memory_usage(v1, directory)
            if usage is None:
                continue
            room = limit - (usage - cache)
            if chosen is None or room < chosen[0]:
                chosen = (room, directory, limit, usage, cache)
        if chosen is None:
            usage, cache = _memory_usage(v1, chain.dirs[0])
            chosen = (0.0, chain.dirs[0], None, usage or 0, cache) if usage is not None else None
        if chosen is None:
            return _MemoryLimit(None, None, None, None)
        _, directory, limit, usage, cache = chosen
        return _MemoryLimit(
            max_mb=None if limit is None else limit / MIB,
            # What the kernel cannot take back without swapping: the page cache it drops
            # before it fails a charge does not count (the working set, as kubelet reads it).
            current_mb=max(0, usage - cache) / MIB,
            cache_mb=cache / MIB,
            events=self._memory_events(v1, directory),
        )

    def _memory_events(self, v1: bool, directory: str) -> int | None:
        if v1:
            text = _read(f"{directory}/memory.failcnt")
            count = int(text) if text is not None else None
        else:
            text = _read(f"{directory}/memory.events")
            events = parse_keyed(text) if text is not None else {}
            keys = ("high", "max", "oom")
            count = sum(events[k] for k in keys) if all(k in events for k in keys) else None
        if count is None:
            self._previous_memory_events = None
            return None
        previous, self._previous_memory_events = self._previous_memory_events, (directory, count)
        if previous is None or previous[0] != directory:
            return None
        return max(0, count - previous[1])


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError:  # absent (no such controller, no PSI) or not readable: no figure
        return None


def _quota_cores(version: int, directory: str) -> float | None:
    if version == 2:
        text = _read(f"{directory}/cpu.max")
        return parse_cpu_max(text) if text is not None else None
    quota = _read(f"{directory}/cpu.cfs_quota_us")
    period = _read(f"{directory}/cpu.cfs_period_us")
    return parse_cfs_quota(quota, period) if quota is not None and period is not None else None


def _memory_usage(v1: bool, directory: str) -> tuple[int | None, int]:
    """(usage bytes, inactive page cache bytes) of one memory cgroup."""
    text = _read(f"{directory}/{USAGE_V1 if v1 else USAGE_V2}")
    if text is None:
        return None, 0
    stat_text = _read(f"{directory}/memory.stat")
    # v1's hierarchical figure is total_*, v2's figures are hierarchical already.
    cache = keyed_value(stat_text or "", "total_inactive_file" if v1 else "inactive_file")
    return int(text), cache or 0


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2
    `cpu.max` or v1 `cpu.cfs_quota_us`, the smallest on the path to the root)."""
    cpus = _usable_cpus()
    quota = ResourceMonitor().cpu_quota_cores()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return cpus


@dataclass(frozen=True)
class ProcessMemory:
    """Another process's memory in MiB, for `edge-agent bench`: resident (RSS), its anonymous
    part (heap, stacks: what no other process or the page cache could share), unique (USS:
    pages no other process maps) and proportional (PSS)."""

    rss_mb: float
    anon_mb: float
    uss_mb: float
    pss_mb: float


def process_memory(pid: int) -> ProcessMemory:
    """RSS, anonymous RSS, USS and PSS of process `pid` (psutil's memory_full_info)."""
    import psutil  # noqa: PLC0415  (where it is read: see the top)

    full = psutil.Process(pid).memory_full_info()
    mb = 1024.0 * 1024.0
    return ProcessMemory(
        rss_mb=full.rss / mb,
        anon_mb=(full.rss - full.shared) / mb,
        uss_mb=full.uss / mb,
        pss_mb=full.pss / mb,
    )


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time that process `pid` has used so far, in seconds."""
    import psutil  # noqa: PLC0415  (where it is read: see the top)

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(os.getpid()))
    except AttributeError:  # not Linux: no affinity masks
        import psutil  # noqa: PLC0415  (where it is read: see the top)

        return psutil.cpu_count() or 1


def _cpu_temperature() -> tuple[float | None, float | None]:
    """(hottest CPU sensor reading, its high or critical trip point) in °C."""
    import psutil  # noqa: PLC0415  (where it is read: see the top)

    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None, None
    sensors = reader()
    for name in CPU_SENSORS:
        readings = [t for t in sensors.get(name, []) if t.current is not None]
        if readings:
            hottest = max(readings, key=lambda t: t.current)
            trip = hottest.high or hottest.critical
            return float(hottest.current), float(trip) if trip else None
    return None, None


def _cpu_frequency() -> tuple[float | None, float | None]:
    """(current, maximum) MHz; psutil reports 0 for what the board does not say."""
    import psutil  # noqa: PLC0415  (where it is read: see the top)

    frequency = psutil.cpu_freq()
    if frequency is None:
        return None, None
    return frequency.current or None, frequency.max or None


# --- a scripted source for tests ---------------------------------------------------------------


def calm_snapshot(monotonic: float = 0.0, **figures: Any) -> ResourceSnapshot:
    """A snapshot of an idle two-core board with plenty of memory; `figures` override it."""
    calm = ResourceSnapshot(
        monotonic=monotonic,
        system_cpu_percent=5.0,
        process_cpu_percent=2.0,
        cpu_count=2,
        memory_available_mb=1500.0,
        memory_total_mb=2000.0,
        process_rss_mb=120.0,
    )
    return dataclasses.replace(calm, **figures)


class FakeSource:
    """Scripted snapshots: a sequence (its last snapshot repeats once it runs out) or a
    function of the clock's time. With `restamp`, each snapshot gets the clock's time."""

    def __init__(
        self,
        script: Iterable[ResourceSnapshot] | Callable[[float], ResourceSnapshot],
        *,
        clock: Callable[[], float] = time.monotonic,
        restamp: bool = False,
    ) -> None:
        self._function = script if callable(script) else None
        self._script: Iterator[ResourceSnapshot] | None = None if callable(script) else iter(script)
        self._clock = clock
        self._restamp = restamp
        self._last: ResourceSnapshot | None = None
        self.samples = 0
        self.exhausted = False

    def sample(self) -> ResourceSnapshot:
        """The next scripted snapshot (a function's errors propagate: sampler tests use it)."""
        now = self._clock()
        if self._function is not None:
            snapshot = self._function(now)
        else:
            scripted = next(self._script, None) if self._script is not None else None
            snapshot = scripted if scripted is not None else self._last_or_fail()
        self._last = snapshot
        self.samples += 1
        return dataclasses.replace(snapshot, monotonic=now) if self._restamp else snapshot

    def _last_or_fail(self) -> ResourceSnapshot:
        self.exhausted = True
        if self._last is None:
            raise ValueError("FakeSource script is empty")
        return self._last


# --- history and the sampler thread ------------------------------------------------------------


class SnapshotHistory:
    """The last `maxlen` snapshots, oldest first; safe to read from any thread."""

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ConfigError(f"snapshot history needs room for one snapshot, not {maxlen}")
        self._snapshots: deque[ResourceSnapshot] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def append(self, snapshot: ResourceSnapshot) -> None:
        with self._lock:
            self._snapshots.append(snapshot)

    def latest(self) -> ResourceSnapshot | None:
        with self._lock:
            return self._snapshots[-1] if self._snapshots else None

    def since(self, monotonic_t: float) -> tuple[ResourceSnapshot, ...]:
        """The snapshots taken at or after `monotonic_t`, oldest first."""
        with self._lock:
            recent = []
            for snapshot in reversed(self._snapshots):
                if snapshot.monotonic < monotonic_t:
                    break
                recent.append(snapshot)
        return tuple(reversed(recent))

    def all(self) -> tuple[ResourceSnapshot, ...]:
        with self._lock:
            return tuple(self._snapshots)

    def __len__(self) -> int:
        with self._lock:
            return len(self._snapshots)


Listener = Callable[[ResourceSnapshot], None]


class ResourceSampler:
    """Samples a source every `interval_s` on one thread into a `SnapshotHistory`, then calls
    each listener with the new snapshot (on that thread: listeners must be quick)."""

    def __init__(
        self,
        source: SnapshotSource,
        interval_s: float,
        history: SnapshotHistory | None = None,
        *,
        history_size: int = 600,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"sampling interval must be > 0 s, not {interval_s}")
        self.source = source
        self.interval_s = interval_s
        self.history = history if history is not None else SnapshotHistory(history_size)
        self._listeners: list[Listener] = []
        self._listeners_lock = threading.Lock()
        # Serialises the source: sample_once() may run beside the thread, and a source
        # keeps baselines between samples.
        self._sample_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_listener(self, listener: Listener) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._listeners_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Take a first sample now (so `history.latest()` is set on return), then sample on
        the sampler thread every `interval_s`."""
        if self.running:
            return
        self._stop.clear()
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop sampling; False when the thread did not end within `timeout_s`."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("monitor_stop_timeout", timeout_s=timeout_s)
            return False
        return True

    def sample_once(self) -> ResourceSnapshot | None:
        """Sample now, record the snapshot and tell the listeners; None if the source failed."""
        with self._sample_lock:
            try:
                snapshot = self.source.sample()
            except Exception:  # a broken source must not end the sampling
                log.exception("monitor_sample_failed", source=type(self.source).__name__)
                return None
        self.history.append(snapshot)
        with self._listeners_lock:
            listeners = tuple(self._listeners)
        for listener in listeners:
            try:
                listener(snapshot)
            except Exception:  # one listener's bug must not starve the others
                log.exception("monitor_listener_failed", listener=repr(listener))
        return snapshot

    def _run(self) -> None:
        due = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            self.sample_once()
            due += self.interval_s
            now = time.monotonic()
            if due < now:  # a stalled board: move the schedule on rather than burst
                due = now + self.interval_s

"""The resource monitor on this machine's real psutil figures, PSI files and cgroup v1
hierarchies (children moved into cgroups made for the test), its parsers on v1 and v2 file
contents in real directories, the scripted source, and the sampler's history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.adapt.monitor import (
    FakeSource,
    ResourceMonitor,
    ResourceSampler,
    SnapshotHistory,
    calm_snapshot,
    keyed_value,
    parse_cfs_quota,
    parse_cpu_max,
    parse_keyed,
    parse_memory_limit,
    parse_mountinfo,
    parse_proc_cgroup,
    parse_psi,
)
from agent.adapt.snapshot import ResourceSnapshot
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


# --- real figures ------------------------------------------------------------------------------


def test_real_figures_are_sane() -> None:
    """On this machine the psutil figures are within their physical ranges."""
    monitor = ResourceMonitor()
    monitor.sample()
    sum(i * i for i in range(200_000))  # some CPU of our own to measure
    snapshot = monitor.sample()
    assert 0.0 <= snapshot.system_cpu_percent <= 100.0
    assert 0.0 <= snapshot.process_cpu_percent <= 100.0 * (os.cpu_count() or 1) + 5
    assert snapshot.cpu_count == len(os.sched_getaffinity(0))
    assert 0 < snapshot.memory_available_mb <= snapshot.memory_total_mb
    assert 1 < snapshot.process_rss_mb < snapshot.memory_total_mb
    assert snapshot.cpu_freq_mhz is None or snapshot.cpu_freq_mhz > 0
    assert snapshot.cpu_temperature_c is None or -40 < snapshot.cpu_temperature_c < 150
    assert snapshot.monotonic > 0
    json.dumps(snapshot.as_dict())


def test_real_pressure_files_are_parsed() -> None:
    """The PSI avg10 figures of /proc/pressure/{cpu,memory} reach the snapshot."""
    if not Path("/proc/pressure/cpu").exists():
        pytest.skip("this kernel reports no PSI (/proc/pressure absent)")
    for resource in ("cpu", "memory"):
        parsed = parse_psi(Path(f"/proc/pressure/{resource}").read_text())
        assert set(parsed) == {"some", "full"}
    snapshot = ResourceMonitor().sample()
    for figure in (
        snapshot.psi_cpu_some_avg10,
        snapshot.psi_cpu_full_avg10,
        snapshot.psi_memory_some_avg10,
        snapshot.psi_memory_full_avg10,
    ):
        assert figure is not None
        assert 0.0 <= figure <= 100.0


def test_unreadable_proc_gives_none_not_an_error(tmp_path: Path) -> None:
    """With nothing readable under the proc root (and garbage in mountinfo) the sample still
    comes, with None for PSI and the cgroup figures."""
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "cgroup").write_text("0::/nowhere\nnot a line\n")
    (tmp_path / "self" / "mountinfo").write_text("garbage - - -\n12 1 0:1 / x\n")
    (tmp_path / "pressure").mkdir()
    (tmp_path / "pressure" / "cpu").write_text("some avg10=oops\n")
    monitor = ResourceMonitor(proc_root=tmp_path)
    for _ in range(2):
        snapshot = monitor.sample()
    assert snapshot.psi_cpu_some_avg10 is None
    assert snapshot.psi_memory_some_avg10 is None
    assert snapshot.cgroup_cpu_quota_cores is None
    assert snapshot.cgroup_memory_max_mb is None
    assert snapshot.cgroup_memory_current_mb is None
    assert snapshot.memory_total_mb > 0


# --- parsers on file contents ------------------------------------------------------------------


def test_parsers_read_v1_and_v2_file_formats() -> None:
    """Each cgroup and PSI format is read as the kernel documents it."""
    psi = (
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n"
        "full avg10=0.25 avg60=0.00 avg300=0.00 total=9\n"
    )
    assert parse_psi(psi) == {"some": 12.5, "full": 0.25}
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("20000 100000\n") == pytest.approx(0.2)
    assert parse_cpu_max("150000 100000\n") == pytest.approx(1.5)
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("50000\n", "100000\n") == pytest.approx(0.5)
    assert parse_memory_limit("max\n") is None
    assert parse_memory_limit("536870912\n") == 512 * MIB
    assert parse_memory_limit("9223372036854771712\n") is None  # v1's "unlimited"
    stat = "usage_usec 5\nnr_periods 40\nnr_throttled 7\nthrottled_usec 900\nbad line here\n"
    assert parse_keyed(stat) == {
        "usage_usec": 5,
        "nr_periods": 40,
        "nr_throttled": 7,
        "throttled_usec": 900,
    }
    assert parse_keyed("low 0\nhigh 3\nmax 1\noom 0\noom_kill 0\n")["high"] == 3
    memory_stat = "anon 5\ninactive_file 7\ntotal_inactive_file 9\nbroken x\n"
    assert keyed_value(memory_stat, "anon") == 5
    assert keyed_value(memory_stat, "inactive_file") == 7
    assert keyed_value(memory_stat, "total_inactive_file") == 9
    assert keyed_value(memory_stat, "file") is None
    assert keyed_value(memory_stat, "broken") is None


def test_proc_cgroup_and_mountinfo_of_hybrid_and_unified_hosts() -> None:
    """/proc/self/cgroup and mountinfo are read for v1 controllers, v2 and escaped paths."""
    hybrid = parse_proc_cgroup("12:memory:/box/a\n4:cpu,cpuacct:/box\n1:name=systemd:/x\n0::/u\n")
    assert hybrid.v2 == "/u"
    assert hybrid.v1["memory"] == "/box/a"
    assert hybrid.v1["cpu"] == hybrid.v1["cpuacct"] == "/box"
    unified = parse_proc_cgroup("0::/system.slice/edge-agent.service\n")
    assert unified.v2 == "/system.slice/edge-agent.service"
    assert unified.v1 == {}
    mounts = parse_mountinfo(
        "25 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw shared:5 - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 /docker/abc /my\\040mounts/memory rw - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    assert [(m.version, str(m.mountpoint)) for m in mounts] == [
        (1, "/sys/fs/cgroup/cpu,cpuacct"),
        (1, "/my mounts/memory"),
        (2, "/sys/fs/cgroup/unified"),
    ]
    assert {"cpu", "cpuacct"} <= mounts[0].controllers
    assert mounts[1].root == "/docker/abc"


# --- the cgroup walk on directories laid out as the kernel lays them out -----------------------


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "pressure").mkdir(exist_ok=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "pressure" / "cpu").write_text(
        "some avg10=40.00 avg60=0 avg300=0 total=1\nfull avg10=0.00 avg60=0 avg300=0 total=0\n"
    )
    (proc / "pressure" / "memory").write_text(
        "some avg10=5.00 avg60=0 avg300=0 total=1\nfull avg10=2.50 avg60=0 avg300=0 total=0\n"
    )
    return proc


def write_files(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def test_v2_quota_throttling_limit_and_events(tmp_path: Path) -> None:
    """On a v2 hierarchy the monitor reads cpu.max, throttling and memory events as deltas
    between samples, and a tighter limit on an ancestor wins."""
    root = tmp_path / "cg"
    proc = fake_proc(
        tmp_path,
        "0::/system.slice/edge-agent.service\n",
        f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw,nsdelegate\n",
    )
    # The real root, as the kernel shows it: no cpu.max, memory.max or memory.current.
    write_files(root, cpu_stat="usage_usec 1\n", memory_stat="anon 1\n")
    slice_ = root / "system.slice"
    service = slice_ / "edge-agent.service"
    write_files(slice_, cpu_max="max 100000\n", memory_max="max\n")
    write_files(
        service,
        cpu_max="50000 100000\n",
        cpu_stat="usage_usec 1\nnr_periods 100\nnr_throttled 10\nthrottled_usec 5\n",
        memory_max=f"{512 * MIB}\n",
        memory_current=f"{256 * MIB}\n",
        memory_stat=f"anon {150 * MIB}\nfile {100 * MIB}\ninactive_file {64 * MIB}\n",
        memory_events="low 0\nhigh 2\nmax 1\noom 0\noom_kill 0\n",
    )
    monitor = ResourceMonitor(proc_root=proc)
    first = monitor.sample()
    assert first.psi_cpu_some_avg10 == 40.0
    assert first.psi_memory_full_avg10 == 2.5
    assert first.cgroup_cpu_quota_cores == pytest.approx(0.5)
    assert first.cgroup_cpu_throttled_ratio is None  # nothing to compare with yet
    assert first.cgroup_memory_max_mb == 512
    assert first.cgroup_memory_current_mb == 192  # usage less the inactive page cache
    assert first.cgroup_memory_cache_mb == 64
    assert first.cgroup_memory_events is None
    assert first.memory_headroom_mb == pytest.approx(min(first.memory_available_mb, 320))

    write_files(service, cpu_stat="nr_periods 150\nnr_throttled 30\n")
    write_files(service, memory_events="low 9\nhigh 5\nmax 1\noom 1\noom_kill 1\n")
    second = monitor.sample()
    assert second.cgroup_cpu_throttled_ratio == pytest.approx(20 / 50)
    assert second.cgroup_memory_events == 4

    # systemd's slice gets tighter limits than the service's own.
    write_files(
        slice_,
        cpu_max="25000 100000\n",
        cpu_stat="nr_periods 7\nnr_throttled 7\n",
        memory_max=f"{300 * MIB}\n",
        memory_current=f"{290 * MIB}\n",
        memory_stat="inactive_file 0\n",
        memory_events="low 0\nhigh 0\nmax 0\noom 0\n",
    )
    third = monitor.sample()
    assert third.cgroup_cpu_quota_cores == pytest.approx(0.25)
    assert third.cgroup_cpu_throttled_ratio is None  # another cgroup: no delta across them
    assert third.cgroup_memory_max_mb == 300
    assert third.cgroup_memory_current_mb == 290
    assert third.cgroup_memory_events is None


def test_a_containers_cgroup_namespace_root_is_read(tmp_path: Path) -> None:
    """In a cgroup namespace the process's cgroup is the mount point itself ("0::/"), and its
    limits there are read."""
    root = tmp_path / "cg"
    proc = fake_proc(tmp_path, "0::/\n", f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n")
    write_files(
        root,
        cpu_max="100000 100000\n",
        memory_max=f"{256 * MIB}\n",
        memory_current=f"{100 * MIB}\n",
        memory_events="low 0\nhigh 0\nmax 0\noom 0\n",
    )
    snapshot = ResourceMonitor(proc_root=proc).sample()
    assert snapshot.cgroup_cpu_quota_cores == 1.0
    assert snapshot.cgroup_memory_max_mb == 256
    assert snapshot.cgroup_memory_current_mb == 100


def test_a_move_to_another_cgroup_is_noticed(tmp_path: Path) -> None:
    """When the process is moved into another cgroup, the next sample reads that one."""
    root = tmp_path / "cg"
    mountinfo = f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n"
    proc = fake_proc(tmp_path, "0::/a\n", mountinfo)
    write_files(root / "a", memory_max=f"{100 * MIB}\n", memory_current=f"{10 * MIB}\n")
    write_files(root / "b", cpu_max="max 100000\n", memory_max="max\n", memory_current="0\n")
    monitor = ResourceMonitor(proc_root=proc)
    assert monitor.sample().cgroup_memory_max_mb == 100
    fake_proc(tmp_path, "0::/b\n", mountinfo)
    moved = monitor.sample()
    assert moved.cgroup_memory_max_mb is None
    assert moved.cgroup_memory_current_mb == 0
    assert moved.cgroup_cpu_quota_cores is None


def test_v1_hierarchies_including_a_bind_mounted_subtree(tmp_path: Path) -> None:
    """On v1 the cpu,cpuacct and memory hierarchies are found through mountinfo, v1's
    "unlimited" is no limit, failcnt is counted, and a container's subtree mount is read."""
    cpu = tmp_path / "cpu,cpuacct"
    memory = tmp_path / "memory"
    proc = fake_proc(
        tmp_path,
        "9:memory:/docker/abc\n4:cpu,cpuacct:/box/inner\n0::/\n",
        f"32 31 0:29 / {cpu} rw - cgroup cgroup rw,cpu,cpuacct\n"
        f"35 31 0:32 /docker/abc {memory} rw - cgroup cgroup rw,memory\n",
    )
    write_files(cpu / "box", cpu_cfs_quota_us="150000\n", cpu_cfs_period_us="100000\n")
    write_files(
        cpu / "box" / "inner",
        cpu_cfs_quota_us="-1\n",
        cpu_cfs_period_us="100000\n",
        cpu_stat="nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
    )
    (cpu / "box" / "cpu.stat").write_text("nr_periods 10\nnr_throttled 1\nthrottled_time 9\n")
    write_files(
        memory,  # the container's own cgroup, seen at the mount point
        memory_limit_in_bytes="9223372036854771712\n",
        memory_usage_in_bytes=f"{40 * MIB}\n",
        memory_stat=f"inactive_file {1 * MIB}\ntotal_inactive_file {8 * MIB}\n",
        memory_failcnt="3\n",
    )
    monitor = ResourceMonitor(proc_root=proc)
    first = monitor.sample()
    assert first.cgroup_cpu_quota_cores == pytest.approx(1.5)
    assert first.cgroup_memory_max_mb is None
    assert first.cgroup_memory_current_mb == 32  # v1's hierarchical total_inactive_file
    (cpu / "box" / "cpu.stat").write_text("nr_periods 30\nnr_throttled 6\nthrottled_time 9\n")
    (memory / "memory.limit_in_bytes").write_text(f"{64 * MIB}\n")
    (memory / "memory.failcnt").write_text("5\n")
    second = monitor.sample()
    assert second.cgroup_cpu_throttled_ratio == pytest.approx(5 / 20)
    assert second.cgroup_memory_max_mb == 64
    assert second.cgroup_memory_events == 2


# --- real v1 cgroups, with a child process moved into them -------------------------------------


def v1_cgroup_dir(controller: str) -> Path:
    """This process's own cgroup in the v1 hierarchy of `controller` (skips when absent)."""
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    mountpoint = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, super_fields = left.split(), right.split()
        is_v1 = super_fields[:1] == ["cgroup"]
        if is_v1 and controller in super_fields[2].split(",") and fields[3] == "/":
            mountpoint = Path(fields[4])
            break
    if mountpoint is None:
        pytest.skip(f"no cgroup v1 hierarchy with the {controller} controller here")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return mountpoint / path.lstrip("/")
    pytest.skip(f"this process is in no {controller} v1 cgroup")


@pytest.fixture
def v1_cgroup(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A new cgroup under this process's own one in the v1 `request.param` hierarchy,
    removed after the test (its child has exited by then)."""
    parent = v1_cgroup_dir(request.param)
    path = parent / f"edge-agent-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as error:  # a read-only cgroupfs (containers): no test cgroups here
        pytest.skip(f"cannot create a cgroup under {parent}: {error}")
    try:
        yield path
    finally:
        path.rmdir()


CHILD_PRELUDE = """
import json, sys
from agent.adapt.monitor import ResourceMonitor
assert sys.stdin.readline() == "go\\n"  # the test has moved us into the cgroup
monitor = ResourceMonitor()
def report(snapshot):
    print(json.dumps(snapshot.as_dict()), flush=True)
"""


def run_in_cgroup(cgroup: Path, body: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Start a Python child, move it into `cgroup`, let it run `body`; its printed snapshots."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(body)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # v1 does not move what the child charged before the move (this kernel refuses
        # memory.move_charge_at_immigrate), so the test looks at what it does after it.
        (cgroup / "cgroup.procs").write_text(f"{child.pid}\n")
        out, err = child.communicate("go\n", timeout=timeout_s)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("v1_cgroup", ["memory"], indirect=True)
def test_real_v1_memory_limit_usage_and_failures(v1_cgroup: Path, tmp_path: Path) -> None:
    """In a v1 memory cgroup of 128 MiB a child sees the limit, its anonymous memory in the
    usage, and the charges that failed while it wrote more file data than the limit (the
    page cache reclaimed, not counted in the usage)."""
    (v1_cgroup / "memory.limit_in_bytes").write_text(f"{128 * MIB}\n")
    big_file = tmp_path / "cache.bin"
    baseline, grown, written = run_in_cgroup(
        v1_cgroup,
        f"""
        report(monitor.sample())
        hog = b"x" * (48 * 1024 * 1024)
        report(monitor.sample())
        with open({str(big_file)!r}, "wb") as file:
            chunk = b"y" * (1024 * 1024)
            for _ in range(192):
                file.write(chunk)
        report(monitor.sample())
        """,
    )
    for snapshot in (baseline, grown, written):
        assert snapshot["cgroup_memory_max_mb"] == 128
        assert 0 < snapshot["cgroup_memory_current_mb"] < 128
    assert grown["cgroup_memory_current_mb"] - baseline["cgroup_memory_current_mb"] > 40
    assert written["cgroup_memory_events"] > 0
    assert written["cgroup_memory_cache_mb"] > 0


@pytest.mark.parametrize("v1_cgroup", ["cpu"], indirect=True)
def test_real_v1_cpu_quota_is_seen_and_throttles(v1_cgroup: Path) -> None:
    """A child in a v1 CPU cgroup limited to 0.2 cores that burns CPU sees the quota and
    that it was throttled, and gets no more than its quota."""
    (v1_cgroup / "cpu.cfs_period_us").write_text("100000\n")
    (v1_cgroup / "cpu.cfs_quota_us").write_text("20000\n")
    # Burn in slices until a sample shows throttling (at most 4 s): on a loaded machine a
    # slice may pass without the child ever getting its 20 ms of a period.
    *_, burnt = run_in_cgroup(
        v1_cgroup,
        """
        import time
        monitor.sample()
        for _ in range(16):
            end = time.monotonic() + 0.25
            while time.monotonic() < end:
                pass
            snapshot = monitor.sample()
            report(snapshot)
            if snapshot.cgroup_cpu_throttled_ratio:
                break
        """,
    )
    assert burnt["cgroup_cpu_quota_cores"] == 0.2
    assert burnt["cgroup_cpu_throttled_ratio"] > 0
    assert burnt["process_cpu_percent"] < 50  # 20 % plus a period's slack at most


# --- the scripted source -----------------------------------------------------------------------


def test_fake_source_plays_its_script_then_repeats_the_last() -> None:
    """A scripted list is returned in order; once it runs out its last snapshot repeats."""
    script = [calm_snapshot(1.0), calm_snapshot(2.0, system_cpu_percent=95.0)]
    source = FakeSource(script)
    assert source.sample() is script[0]
    assert source.sample() is script[1]
    assert not source.exhausted
    assert source.sample() is script[1]
    assert source.exhausted
    assert source.samples == 3


def test_fake_source_as_a_function_of_time() -> None:
    """A function source is called with the clock's time; `restamp` stamps list snapshots."""
    clock = iter([0.0, 5.0, 12.0])
    source = FakeSource(
        lambda t: calm_snapshot(t, system_cpu_percent=90.0 if t >= 5 else 10.0),
        clock=lambda: next(clock),
    )
    figures = [(s.monotonic, s.system_cpu_percent) for s in (source.sample() for _ in range(3))]
    assert figures == [(0.0, 10.0), (5.0, 90.0), (12.0, 90.0)]
    stamped = FakeSource([calm_snapshot(0.0)], clock=lambda: 42.0, restamp=True)
    assert stamped.sample().monotonic == 42.0
    with pytest.raises(ValueError, match="empty"):
        FakeSource([]).sample()


def test_calm_snapshot_takes_overrides() -> None:
    """calm_snapshot is an idle board unless told otherwise."""
    snapshot = calm_snapshot(3.0, cgroup_memory_max_mb=256.0, cgroup_memory_current_mb=200.0)
    assert snapshot.monotonic == 3.0
    assert snapshot.memory_headroom_mb == 56.0
    assert snapshot.system_cpu_percent < 50


# --- history and sampler -----------------------------------------------------------------------


def test_history_is_bounded_and_answers_by_time() -> None:
    """The history keeps the last maxlen snapshots, oldest first, and selects by time."""
    history = SnapshotHistory(maxlen=3)
    assert history.latest() is None
    assert history.all() == ()
    snapshots = [calm_snapshot(float(t)) for t in range(5)]
    for snapshot in snapshots:
        history.append(snapshot)
    assert len(history) == 3
    assert history.all() == tuple(snapshots[2:])
    assert history.latest() is snapshots[4]
    assert history.since(3.0) == tuple(snapshots[3:])
    assert history.since(3.5) == (snapshots[4],)
    assert history.since(0.0) == tuple(snapshots[2:])
    assert history.since(9.0) == ()
    with pytest.raises(ConfigError):
        SnapshotHistory(maxlen=0)


def test_history_under_concurrent_writers_and_readers() -> None:
    """Readers on other threads always see an ordered, bounded history while it is written."""
    history = SnapshotHistory(maxlen=50)
    errors: list[str] = []

    def write(offset: int) -> None:
        for i in range(2000):
            history.append(calm_snapshot(float(i * 4 + offset)))

    def read() -> None:
        for _ in range(2000):
            snapshots = history.all()
            if len(snapshots) > 50:
                errors.append(f"{len(snapshots)} snapshots")
            history.since(100.0)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(history) == 50


def test_sampler_feeds_history_and_listeners_until_stopped() -> None:
    """The sampler records a first snapshot on start, then samples on its own thread and
    tells each listener, until stop() ends the thread."""
    script = [calm_snapshot(float(t), system_cpu_percent=float(t)) for t in range(1000)]
    source = FakeSource(script)
    sampler = ResourceSampler(source, interval_s=0.01, history_size=5)
    seen: list[ResourceSnapshot] = []
    enough = threading.Event()

    def listen(snapshot: ResourceSnapshot) -> None:
        seen.append(snapshot)
        if len(seen) >= 8:
            enough.set()

    sampler.add_listener(listen)
    sampler.start()
    try:
        assert sampler.history.latest() is script[0]
        assert enough.wait(30)
    finally:
        assert sampler.stop(timeout_s=10)
    assert not sampler.running
    taken = source.samples
    assert seen == script[:taken]
    assert sampler.history.all() == tuple(script[taken - 5 : taken])
    sampler.remove_listener(listen)
    sampler.sample_once()
    assert len(seen) == taken


def test_sampler_survives_failing_listeners_and_sources() -> None:
    """A listener that raises is logged and the next listener still runs; a source that
    raises is logged and records nothing."""
    calls: list[float] = []

    def broken(snapshot: ResourceSnapshot) -> None:
        raise RuntimeError("listener bug")

    sampler = ResourceSampler(FakeSource([calm_snapshot(7.0)]), interval_s=1.0)
    sampler.add_listener(broken)
    sampler.add_listener(lambda s: calls.append(s.monotonic))
    with structlog.testing.capture_logs() as logs:
        assert sampler.sample_once() is not None
    assert calls == [7.0]
    assert [entry["event"] for entry in logs] == ["monitor_listener_failed"]

    def failing(t: float) -> ResourceSnapshot:
        raise OSError("board gone")

    failing_sampler = ResourceSampler(FakeSource(failing), interval_s=1.0)
    with structlog.testing.capture_logs() as logs:
        assert failing_sampler.sample_once() is None
    assert [entry["event"] for entry in logs] == ["monitor_sample_failed"]
    assert failing_sampler.history.latest() is None
    with pytest.raises(ConfigError):
        ResourceSampler(FakeSource([calm_snapshot()]), interval_s=0)


def test_sampler_runs_the_real_monitor() -> None:
    """The sampler drives the real monitor on its thread; stop() returns once it ended."""
    sampler = ResourceSampler(ResourceMonitor(), interval_s=0.02)
    two = threading.Event()
    sampler.add_listener(lambda s: two.set() if len(sampler.history) >= 2 else None)
    sampler.start()
    try:
        assert two.wait(30)
    finally:
        assert sampler.stop(timeout_s=10)
    first, second = sampler.history.all()[:2]
    assert second.monotonic > first.monotonic
    assert second.memory_total_mb > 0

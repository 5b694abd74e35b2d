"""tools/bench_peers.py where its peers are not installed: MLServer and KServe are never
dependencies, so the tool says what is missing and exits 0 (measuring them needs them)."""

from __future__ import annotations

import subprocess
import sys

from tests.onnx_models import REPO


def test_bench_peers_without_mlserver_or_kserve_says_so_and_exits_0() -> None:
    """With no python that can import MLServer or KServe, the tool names both as not
    installed, says there is nothing to compare, and exits 0 without starting anything."""
    missing = str(REPO / "no-such-python")
    done = subprocess.run(
        [
            *(sys.executable, str(REPO / "tools" / "bench_peers.py")),
            *("--mlserver-python", missing, "--kserve-python", missing),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "MLServer: not installed" in done.stderr and "KServe: not installed" in done.stderr
    assert "nothing to compare" in done.stdout

"""tools/bench_adapt.py end to end at a tiny scale: it runs and prints its table (the
figures themselves are for people, not asserted)."""

from __future__ import annotations

import subprocess
import sys

from tests.onnx_models import REPO


def test_bench_adapt_runs_the_scenario_and_prints_its_table() -> None:
    """A synthetic two-rung ladder at 3% of the scenario's length: the adaptive and one
    pinned agent run, and the table with every phase and the targets comes out."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench_adapt.py"),
            "--synthetic",
            "--synthetic-rungs",
            "2",
            "--synthetic-ms",
            "3",
            "--pinned",
            "0",
            "--scale",
            "0.03",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for phase in ("calm", "busy loops", "calm again", "burst", "whole"):
        assert f"adaptive           {phase}" in table, table
    assert "pinned depth" in table
    assert "targets (issue 7):" in table
    assert table.count("] ") >= 5, table  # one verdict per target
    assert "bench_phase" in done.stderr  # progress went to stderr, with the time left

"""Peak memory of loading a model and running it once, measured in a fresh child process.

Run as `python -m compressor.memprobe MODEL FEED.npz THREADS`; prints one JSON line. The
child imports numpy, onnxruntime and the agent's session module (whose option builder it
uses, as the agent does) before its baseline, so the baseline is what the agent's process
already pays and the difference is what the variant adds. The feed is a batch of the size
the agent serves: activations at that batch are part of what the variant costs.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from compressor.errors import ModelLoadError


def probe_peak_rss_mb(model: Path, feed: dict[str, np.ndarray], threads: int) -> float:
    """Peak RSS (MiB) added by loading `model` and running `feed` once, in a child process."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-probe-") as tmp:
        feed_path = Path(tmp) / "feed.npz"
        with feed_path.open("wb") as fh:
            np.savez(fh, **feed)  # type: ignore[arg-type]
        done = subprocess.run(
            [sys.executable, "-m", "compressor.memprobe", str(model), str(feed_path), str(threads)],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    if done.returncode != 0:
        raise ModelLoadError(f"{model}: the memory probe failed: {done.stderr.strip()[-500:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    added_kib = float(figures["peak_kib"]) - float(figures["baseline_kib"])
    return max(0.0, added_kib / 1024.0)


def _reset_peak_kib() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS and return it (KiB).

    Importing onnxruntime peaks above its steady state; without the reset a small model
    would never raise the mark and would measure as free.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _peak_kib()


def _peak_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _main(argv: list[str]) -> int:
    # Imported before the baseline on purpose: the agent's process has them loaded already.
    import onnxruntime as ort  # noqa: PLC0415

    from agent.session import PROVIDERS, SessionSettings, session_options  # noqa: PLC0415

    model, feed_path, threads = argv
    with np.load(feed_path, allow_pickle=False) as npz:
        feed = {name: npz[name] for name in npz.files}
    baseline = _reset_peak_kib()
    options = session_options(SessionSettings(threads=int(threads), warmup=False))
    session = ort.InferenceSession(model, options, providers=PROVIDERS)
    session.run(None, feed)
    peak = _peak_kib()
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

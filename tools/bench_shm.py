"""A 320x320 CNN request through shared memory against raw onnxruntime (issue 10, part 1):
`edge-agent bench --shm --binary` on a CNN built on the spot (tests/onnx_models.py, no
download), with request counts scaled to a model of about 15 ms a run.

The measuring is `edge-agent bench`'s (agent/bench.py, agent/bench_shm.py): the agent's
round trip through shared memory as the client sees it, inputs in place and written by the
client, beside raw onnxruntime with the agent's session options on the same input and the
echo of the request; the main rows give the frame as a binary tensor over MQTT. Flags after
the ones below go to `edge-agent bench` as they are (a later flag wins); zero-copy mode is
`EDGE_AGENT_SHM__ZERO_COPY=true` in the environment (or `[shm] zero_copy` in `--config`).

    .venv/bin/python tools/bench_shm.py [--size 320] [edge-agent bench flags, e.g. --json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.onnx_models

from agent.cli import main as edge_agent
from tests.onnx_models import cnn_model, ladder_folder

CLASSES = 1000
# A run of the CNN takes about 15 ms here: fewer requests than the demo model's defaults.
SCALED = [
    *("--requests", "100", "--rounds", "4", "--duration", "2", "--concurrency", "4"),
    *("--start-rounds", "1", "--shm-requests", "200"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="image side (pixels)")
    args, bench_flags = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="bench-shm-") as tmp:
        cnn = cnn_model(Path(tmp) / "cnn.onnx", size=args.size, classes=CLASSES)
        folder = ladder_folder(
            Path(tmp) / "models" / "cnn",
            [("fp32", cnn)],
            inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 3, args.size, args.size]}],
            outputs=[{"name": "scores", "datatype": "FP32", "shape": [-1, CLASSES]}],
        )
        return edge_agent(
            ["bench", "--model-dir", str(folder), "--shm", "--binary", *SCALED, *bench_flags]
        )


if __name__ == "__main__":
    sys.exit(main())

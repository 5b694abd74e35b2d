#!/usr/bin/env bash
# Rebuild the demo model and its ladder of variants (models/digits), as committed:
# train the MLP, then let edge-compress build, measure and select the lighter variants.
# Needs the `compress` extra (tools/test.sh installs it into .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python tools/build_demo_model.py --out "$work/digits"
.venv/bin/edge-compress ladder "$work/digits/fp32.onnx" --out models/digits --force \
  --calib tools/requests/digits-calib.npz --eval tools/requests/digits-eval.npz --seed 0

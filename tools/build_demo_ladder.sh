#!/usr/bin/env bash
# Rebuild the demo models and their ladders of variants, as committed:
#   models/digits      the MLP (scikit-learn), then edge-compress builds, measures and selects
#                      the lighter variants;
#   models/digits-cnn  the adapting demo's CNN (PyTorch: needs the `train` extra; skipped with
#                      a note when torch is missing), its variants differing clearly in cost.
# Needs the `compress` extra (tools/test.sh installs it into .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python tools/build_demo_model.py --out "$work/digits"
.venv/bin/edge-compress ladder "$work/digits/fp32.onnx" --out models/digits --force \
  --calib tools/requests/digits-calib.npz --eval tools/requests/digits-eval.npz --seed 0
if .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python tools/build_demo_cnn.py --out "$work/digits-cnn" --data "$work/data"
  .venv/bin/edge-compress ladder "$work/digits-cnn/fp32.onnx" --out models/digits-cnn --force \
    --calib "$work/data/calib.npz" --eval "$work/data/eval.npz" \
    --seed 0 --prune-ratios 0.5,0.75,0.875 --calibrations minmax --budget 0.2 --rounds 5
  # Timed again on its own, as quietly as the machine allows: the policy reads these figures.
  .venv/bin/edge-compress retime models/digits-cnn --rounds 15
else
  echo "build_demo_ladder: torch is missing (pip install -e '.[train]'): models/digits-cnn kept" >&2
fi

#!/usr/bin/env bash
# The main job on the embedded synthetic default, from a fresh machine: set up, prepare, meta-train,
# evaluate (mean accuracy ± 95% CI on 600 stored test episodes) and export to ONNX/TorchScript.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FSLTOOL=.venv/bin/fsltool
mkdir -p data
[ -f data/synthetic.h5 ] || "$FSLTOOL" prepare synthetic data/synthetic.h5
"$FSLTOOL" meta-train recipes/synthetic/protonet-quick.yaml --force
"$FSLTOOL" evaluate runs/synthetic/protonet-quick --json runs/synthetic/protonet-quick/test-5w1s.json
"$FSLTOOL" export runs/synthetic/protonet-quick

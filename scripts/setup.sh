#!/usr/bin/env bash
# Create .venv (if needed) and install fsltool into it. torch goes in FIRST, pinned: with no torch
# installed, pip would resolve the bare `torch` requirement to a multi-GB CUDA build.
#   TORCH_SPEC   torch requirement to install first (default torch==2.13.0, a CPU build on these machines)
#   VENV         virtual environment folder (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
pip_quiet() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_quiet "$TORCH_SPEC"
# -W: before the project's dependencies, numpy is absent and torch warns about it on import (harmless)
"$VENV/bin/python" -W ignore::UserWarning -c "import torch" || { echo "setup: torch did not install ($TORCH_SPEC)" >&2; exit 1; }
pip_quiet -e ".[test]"
"$VENV/bin/fsltool" --version >/dev/null || { echo "setup: fsltool did not install" >&2; exit 1; }

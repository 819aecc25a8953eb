#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, one pytest-xdist worker per core (each test module's tests
# stay in one worker, so its module fixtures are built once). Extra arguments go to pytest (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n auto --dist loadscope "$@"

#!/usr/bin/env bash
# Set up a fresh venv and run the demo on embedded defaults (no server to install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e '.[sqlite]' 2>&1 | grep -v '^WARNING: Location' || true
exec .venv/bin/python examples/counter_demo.py "$@"

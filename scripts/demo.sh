#!/usr/bin/env bash
# Set up a fresh venv and start the web demo on embedded defaults (no server to install):
# FastAPI + uvicorn on http://127.0.0.1:8000, state in SQLite at .keyhive-demo/sessions.db.
# It installs the keyhive command too: .venv/bin/keyhive ls sqlite:///.keyhive-demo/sessions.db
# Options go to the demo: --port 8001, --idle 5, --host ... ; the console demo is
# examples/counter_demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e '.[fastapi,sqlite,cli]' 2>&1 | grep -v '^WARNING: Location' || true
exec .venv/bin/python examples/webapp.py "$@"

"""The benchmark suite keeps running: a quick W2 + W5 run writes its rows (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_rows_and_one_activation(tmp_path: Path) -> None:
    """`python -m bench --quick --only W2,W5 --json` lists every implementation and W5 == 1."""
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "W2,W5", "--json", str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=110,
    )
    data = json.loads(out.read_text())
    rows = data["rows"]
    seen = {(r["workload"].split()[0], r["impl"]) for r in rows}
    for impl in ("keyhive", "floor", "nigrains"):
        assert ("W2", impl) in seen
        assert ("W5", impl) in seen
    race = [r for r in rows if r["workload"].startswith("W5")]
    assert all(r["value"] == 1 for r in race), race
    assert all(isinstance(r["value"], int | float) for r in rows if r["workload"].startswith("W2"))
    assert not any(r["workload"].startswith("W1") for r in rows)
    assert {"machine", "targets"} <= data.keys()


def test_bench_runs_an_open_issue_module_in_its_own_process(tmp_path: Path) -> None:
    """`python -m bench --quick --only P` runs bench.pubsub and carries its rows into the JSON."""
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "P", "--json", str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=110,
    )
    data = json.loads(out.read_text())
    assert data["rows"] == []  # the core workloads were not asked for
    (extra,) = data["extras"]
    assert (extra["module"], extra["returncode"]) == ("pubsub", 0)
    rows = extra["data"]["rows"] if isinstance(extra["data"], dict) else extra["data"]
    assert rows and all(isinstance(r.get("value"), int | float) for r in rows)

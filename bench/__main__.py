"""``python -m bench [--quick] [--json out.json] [--only W1,W3] [--results]``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import report
from .workloads import WORKLOADS


def _storage_runner() -> Any:
    """``bench.storage.run`` (S1/S2 storage storms) when that module exists, else None."""
    if importlib.util.find_spec("bench.storage") is None:
        return None
    from . import storage  # type: ignore[attr-defined,unused-ignore]

    return storage.run


# Workloads whose result moves most with the machine's other load: the median of runs.
REPEATS = {"W1": 3, "W2": 3, "W3": 3, "W6": 3, "W7": 3}


def _median(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    if len(runs) == 1:
        return runs[0]
    merged = []
    for i, first in enumerate(runs[0]):
        if first["value"] is None:  # not measurable for this implementation
            merged.append(first)
            continue
        values = sorted(run[i]["value"] for run in runs)
        merged.append({**first, "value": statistics.median(values), "runs": values})
    return merged


async def run(only: set[str], quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, workload in WORKLOADS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        runs = []
        for _ in range(1 if quick else REPEATS.get(name, 1)):
            gc.collect()
            runs.append(await workload(quick))
        rows.extend(_median(runs))
        print(f"[{name} done in {time.perf_counter() - t0:.1f}s]", file=sys.stderr, flush=True)
    if not only or only & {"S1", "S2"}:
        storms = _storage_runner()
        if storms is None:
            print("[S1/S2 skipped: bench/storage.py is not there]", file=sys.stderr)
        else:
            srows = await storms(quick)
            rows.extend(r for r in srows if not only or r["workload"].split()[0] in only)
    return rows


# The open issues' benchmarks, each its own module (run in its own process: Ray clusters and
# OpenTelemetry providers must not leak into the other rows): group letter -> module.
EXTRAS = {"D": "durability", "P": "pubsub", "T": "timers", "B": "bounds", "O": "otel", "R": "ray_bench"}


def run_extras(groups: set[str], quick: bool) -> list[dict[str, Any]]:
    """Run ``python -m bench.<module> --json`` for each group; return their JSON (or the error)."""
    import json
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    out = []
    for group, module in EXTRAS.items():
        if groups and group not in groups:
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="keyhive-bench-") as tmp:
            path = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", f"bench.{module}", "--json", str(path)]
            cmd += ["--quick"] if quick else []
            rc = subprocess.run(cmd, cwd=root, check=False).returncode
            data = json.loads(path.read_text()) if rc == 0 and path.exists() else None
        out.append({"group": group, "module": module, "returncode": rc, "data": data})
        print(f"[bench.{module} done in {time.perf_counter() - t0:.1f}s, exit {rc}]", file=sys.stderr,
              flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, for CI (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write rows, ratios and targets as JSON")
    parser.add_argument("--only", metavar="W1,W3", default="", help="run only these workloads")
    parser.add_argument("--results", action="store_true",
                        help="rewrite bench/RESULTS.md (a full run writes it unless --only/--quick)")
    names = ", ".join(f"{g}=bench.{m}" for g, m in EXTRAS.items())
    parser.add_argument("--no-extras", action="store_true", help=f"skip the open issues' modules ({names})")
    args = parser.parse_args(argv)
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    groups = {w for w in only if w in EXTRAS}
    only -= groups
    unknown = only - set(WORKLOADS) - {"S1", "S2"}
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))} (extras: {', '.join(EXTRAS)})")
    core = not groups or bool(only)
    rows = report.add_ratios(asyncio.run(run(only, args.quick))) if core else []
    extras = [] if args.no_extras or (only and not groups) else run_extras(groups, args.quick)
    checks = report.check_targets(rows) if rows else []
    if rows:
        report.print_table(rows)
        print()
    for c in checks:
        mark = "MET " if c["met"] else ("n/a " if c["met"] is None else "MISS")
        print(f"{mark} {c['target']}: {c['detail']}")
    if args.json:
        report.write_json(args.json, rows, checks, sys.argv, extras)
    if args.results or not (only or groups or args.quick):
        report.write_results(Path(__file__).with_name("RESULTS.md"), rows, checks, "python -m bench",
                             report.analysis_text(), extras=extras)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

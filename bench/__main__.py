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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, for CI (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write rows, ratios and targets as JSON")
    parser.add_argument("--only", metavar="W1,W3", default="", help="run only these workloads")
    parser.add_argument("--results", action="store_true",
                        help="rewrite bench/RESULTS.md (a full run writes it unless --only/--quick)")
    args = parser.parse_args(argv)
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = only - set(WORKLOADS) - {"S1", "S2"}
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    rows = report.add_ratios(asyncio.run(run(only, args.quick)))
    checks = report.check_targets(rows)
    report.print_table(rows)
    print()
    for c in checks:
        mark = "MET " if c["met"] else ("n/a " if c["met"] is None else "MISS")
        print(f"{mark} {c['target']}: {c['detail']}")
    if args.json:
        report.write_json(args.json, rows, checks, sys.argv)
    if args.results or not (only or args.quick):
        report.write_results(Path(__file__).with_name("RESULTS.md"), rows, checks, "python -m bench",
                             report.analysis_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

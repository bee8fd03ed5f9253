"""The table, the JSON file and ``bench/RESULTS.md``: ratios and targets of issues 4 and 3."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]

# (label, workload, impl compared with, test on (keyhive, other)) — issue 4's targets
TARGETS: list[tuple[str, str, str | None, Callable[[float, float], bool]]] = [
    ("W1 (1 task) >= 0.5x floor", "W1 cold get+call (1 task)", "floor", lambda k, o: k >= 0.5 * o),
    ("W1 (1 task) >= 3x nigrains", "W1 cold get+call (1 task)", "nigrains", lambda k, o: k >= 3 * o),
    ("W1 (1000 tasks) >= 0.5x floor", "W1 cold get+call (1000 tasks)", "floor", lambda k, o: k >= 0.5 * o),
    ("W1 (1000 tasks) >= 3x nigrains", "W1 cold get+call (1000 tasks)", "nigrains", lambda k, o: k >= 3 * o),
    ("W2 same key <= 3x floor ns", "W2 hot get (same key)", "floor", lambda k, o: k <= 3 * o),
    ("W2 cycling <= 3x floor ns", "W2 hot get (cycling keys)", "floor", lambda k, o: k <= 3 * o),
    ("W3 sequential >= 0.5x floor", "W3 call, held ref (sequential)", "floor", lambda k, o: k >= 0.5 * o),
    ("W3 sequential >= 3x nigrains", "W3 call, held ref (sequential)", "nigrains", lambda k, o: k >= 3 * o),
    ("W3 concurrent >= 0.5x floor", "W3 call, 1000 concurrent callers", "floor", lambda k, o: k >= 0.5 * o),
    ("W4 <= 2x floor bytes (RSS, after get+call)", "W4 memory per idle agent after get+call (RSS)", "floor",
     lambda k, o: k <= 2 * o),
    ("W4 <= 2x floor bytes (RSS, after get)", "W4 memory per idle agent after get (RSS)", "floor",
     lambda k, o: k <= 2 * o),
    ("W4 1,000,000 agents < 1 GiB RSS", "W4 1,000,000 live agents (total RSS)", None, lambda k, _: k < 1024),
    ("W5 exactly one activation", "W5 concurrent gets of one new key: activations", None,
     lambda k, _: k == 1),
    ("W6 all stopped <= 50 ms after last deadline", "W6 idle churn: all stopped after last deadline", None,
     lambda k, _: k <= 50),
    ("W7 <= 2 us per pair", "W7 attach+detach pair", None, lambda k, _: k <= 2000),
]

IMPLS = ("keyhive", "floor", "nigrains")


def _all_targets() -> list[tuple[str, str, str | None, Callable[[float, float], bool]]]:
    """Issue 4's targets, and issue 3's storage-storm targets from bench/storage.py."""
    from .storage import TARGETS as STORAGE_TARGETS

    return TARGETS + STORAGE_TARGETS


def _by(rows: Rows) -> dict[str, dict[str, dict[str, Any]]]:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        table.setdefault(r["workload"], {})[r["impl"]] = r
    return table


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.2f}" if abs(v) >= 1 else f"{v:.3f}"


def ratio(k: dict[str, Any] | None, o: dict[str, Any] | None) -> float | None:
    if k is None or o is None or k["value"] is None or not o["value"]:
        return None
    return float(k["value"]) / float(o["value"])


def add_ratios(rows: Rows) -> Rows:
    table = _by(rows)
    for r in rows:
        if r["impl"] == "keyhive":
            for other in ("floor", "nigrains"):
                rt = ratio(r, table[r["workload"]].get(other))
                if rt is not None:
                    r[f"vs_{other}"] = round(rt, 3)
    return rows


def check_targets(rows: Rows) -> list[dict[str, Any]]:
    table = _by(rows)
    out = []
    for label, workload, other, test in _all_targets():
        impls = table.get(workload, {})
        k = impls.get("keyhive")
        o = impls.get(other) if other else None
        if k is None or k["value"] is None or (other and (o is None or o["value"] is None)):
            out.append({"target": label, "met": None, "detail": "not measured in this run"})
            continue
        met = bool(test(k["value"], o["value"] if o else 0))
        detail = f"keyhive {_fmt(k['value'])} {k['unit']}"
        if o:
            detail += f", {other} {_fmt(o['value'])} ({ratio(k, o):.2f}x)"
        out.append({"target": label, "met": met, "detail": detail})
    return out


def table_md(rows: Rows) -> str:
    lines = ["| workload | unit | keyhive | floor | nigrains | keyhive/floor | keyhive/nigrains |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for workload, impls in _by(rows).items():
        k = impls.get("keyhive")
        unit = next(iter(impls.values()))["unit"]
        cells = [_fmt(impls[i]["value"]) if i in impls else "-" for i in IMPLS]
        rf = ratio(k, impls.get("floor"))
        rn = ratio(k, impls.get("nigrains"))
        lines.append(f"| {workload} | {unit} | " + " | ".join(cells)
                     + f" | {'' if rf is None else f'{rf:.2f}x'} | {'' if rn is None else f'{rn:.2f}x'} |")
    return "\n".join(lines)


def targets_md(checks: list[dict[str, Any]]) -> str:
    lines = ["| target (issues 4 and 3) | met | measured |", "|---|:-:|---|"]
    for c in checks:
        met = {True: "yes", False: "**no**", None: "-"}[c["met"]]
        lines.append(f"| {c['target']} | {met} | {c['detail']} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def print_table(rows: Rows) -> None:
    width = max(len(w) for w in _by(rows))
    print(f"{'workload':<{width}}  {'keyhive':>12} {'floor':>12} {'nigrains':>12}  {'k/floor':>8} "
          f"{'k/nigr':>8}  unit")
    for workload, impls in _by(rows).items():
        k = impls.get("keyhive")
        cells = " ".join(f"{_fmt(impls[i]['value']) if i in impls else '-':>12}" for i in IMPLS)
        rf, rn = ratio(k, impls.get("floor")), ratio(k, impls.get("nigrains"))
        print(f"{workload:<{width}}  {cells}  {'' if rf is None else f'{rf:.2f}x':>8} "
              f"{'' if rn is None else f'{rn:.2f}x':>8}  {next(iter(impls.values()))['unit']}")
    for r in rows:
        if r.get("note") and r["impl"] != "keyhive":
            print(f"  note: {r['workload']} / {r['impl']}: {r['note']}")


def write_json(path: str, rows: Rows, checks: list[dict[str, Any]], argv: list[str],
               extras: list[dict[str, Any]] | None = None) -> None:
    Path(path).write_text(json.dumps({"machine": machine(), "argv": argv, "rows": rows, "targets": checks,
                                      "extras": extras or []},
                                     indent=2, ensure_ascii=False, default=str) + "\n")


def extras_md(extras: list[dict[str, Any]]) -> str:
    """The open issues' modules' rows (each module's own JSON), one table per module."""
    parts = []
    for e in extras:
        data = e["data"]
        rows = data.get("rows", []) if isinstance(data, dict) else (data or [])
        checks = data.get("checks", data.get("targets", [])) if isinstance(data, dict) else []
        parts.append(f"### `python -m bench.{e['module']}`" + ("" if e["returncode"] == 0 else
                                                               f" (exit {e['returncode']}: no rows)"))
        if rows:
            parts.append("| workload | impl | value | unit | note |\n|---|---|---|---|---|")
            for r in rows:
                if not isinstance(r, dict):
                    continue
                v = r.get("value")
                shown = _fmt(v) if isinstance(v, int | float) else ("-" if v is None else str(v))
                name = r.get("workload") or " ".join(str(r[k]) for k in ("id", "what") if r.get(k))
                note = r.get("note") or "; ".join(f"{k} {r[k]}" for k in ("plain_ray", "target", "met")
                                                  if r.get(k) is not None)
                parts.append(f"| {name} | {r.get('impl', '')} | {shown} | {r.get('unit', '')} | {note} |")
        for c in checks if isinstance(checks, list) else []:
            if isinstance(c, dict):
                met = c.get("met")
                mark = "met" if met else ("n/a" if met is None else "**missed**")
                parts.append(f"- {mark}: {c.get('target', c.get('name', ''))} "
                             f"{c.get('detail', c.get('ratio', c.get('value', '')))}")
        parts.append("")
    return "\n".join(parts)


def write_results(path: Path, rows: Rows, checks: list[dict[str, Any]], command: str,
                  analysis: str = "", machine_info: dict[str, Any] | None = None,
                  extras: list[dict[str, Any]] | None = None) -> None:
    m = machine_info or machine()
    notes = sorted({f"- {r['workload']} / {r['impl']}: {r['note']}" for r in rows if r.get("note")})
    met = sum(1 for c in checks if c["met"])
    missed = [f"{c['target']} ({c['detail']})" for c in checks if c["met"] is False]
    missed_text = ("Missed: " + "; ".join(missed) + " — see the analysis at the end.") if missed else ""
    text = f"""# keyhive benchmark results

keyhive is measured side by side, in one process and one run, with two baselines: **the
plain-asyncio floor** (`bench/floor.py`: a dict of small objects, a lazily created
`asyncio.Lock` per key, no task per agent, single-flight creation — what any design pays
at least) and **nigrains 0.3.1** (the fastest Python virtual-actor peer, through its
public API). {met} of {len(checks)} targets of issues 4 and 3 are met on this machine
({m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['date']}). {missed_text}

Regenerate with `{command}`; `python -m bench --quick` is the CI smoke run.

{table_md(rows)}

## The open issues' rows (each module run in its own process, same run)

{extras_md(extras or [])}

## Targets

{targets_md(checks)}

## Machine

- {m['cpu']}, {m['cores']} cores; {m['platform']}
- {m['implementation']} {m['python']}
- {m['date']}; load average at the end of the run: {m['loadavg']} (other work shared the machine,
  so every timed workload but W4/W5 is the median of 3 runs, timed in process CPU time; W6's
  lateness is wall time)

## How each workload is measured

- **W1** `get` + first `call` on N distinct keys, from one task and split over 1,000 tasks.
  keyhive runs with an idle timeout (timer armed) and `storage=None`.
- **W2** `await manager.get(key)` on a live key, the same key and cycling over 100,000 keys; `lookup` too.
- **W3** `await ref.call("incr")` on a held ref; 1,000 callers over 1,000 keys that yield to each
  other after every call (they interleave); `manager.call(key, msg)` (get + call).
- **W4** a fresh subprocess per implementation (`python -m bench.memory IMPL N`): growth per live
  idle agent (idle timer armed, empty-dict state) after `get`, and after a first call too (the
  floor creates its per-agent lock then), by RSS (`/proc/self/statm`) and by tracemalloc; keys
  are built before the first reading. The 1,000,000 row is the whole process's RSS.
- **W5** N concurrent `get`s of one new key whose start suspends (1 ms); the count of activations.
- **W6** N agents with a 1 s idle timeout (keyhive: memory storage; the floor encodes states into a
  dict): loop time from the last idle deadline until the last agent has stopped, and the process
  CPU time spent meanwhile per agent.
- **W7** `await ref.attach(owner)` + `await ref.detach(owner)` with an owner token; also with the
  default owner (the current task, which adds a done-callback).

{chr(10).join(notes)}

{analysis}"""
    path.write_text(text)


def analysis_text() -> str:
    """``bench/ANALYSIS.md``, appended to RESULTS.md (what the time goes to, the misses)."""
    path = Path(__file__).with_name("ANALYSIS.md")
    return path.read_text() if path.exists() else ""


if __name__ == "__main__":
    # python -m bench.report bench/results.json: rewrite RESULTS.md from a saved full run
    saved = json.loads(Path(sys.argv[1]).read_text())
    write_results(Path(__file__).with_name("RESULTS.md"), saved["rows"], saved["targets"], "python -m bench",
                  analysis_text(), saved["machine"])

"""``python -m bench.otel [--quick] [--json out.json]``: what OpenTelemetry costs a call.

W3's sequential ``manager.call(key)`` on one live key, in one process and one run, for:

* **off**: a manager never instrumented (the code every user runs without ``keyhive[otel]``);
* **on**: instrumented with the SDK's tracer provider (a ``BatchSpanProcessor`` into an
  exporter that drops everything) and meter provider (a periodic reader, same), so every
  call makes and ends a recorded span and records the call-duration histogram;
* **on, not sampled**: the same with the ``ALWAYS_OFF`` sampler (non-recording spans);
* **off again**: the same manager after ``uninstrument()``.

Also the held-ref ``ref.call`` row, which instrumenting does not touch. Target: on >= 0.75x
off. CPU time (``time.process_time``), the median of 3 rounds that alternate the variants.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import keyhive
from keyhive.integrations.otel import instrument

from .workloads import Counter, perf

TARGET = 0.75


class _DropSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _DropMetrics(MetricExporter):
    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


def _providers(sampled: bool) -> tuple[TracerProvider, MeterProvider]:
    tracer_provider = TracerProvider() if sampled else TracerProvider(sampler=ALWAYS_OFF)
    tracer_provider.add_span_processor(BatchSpanProcessor(_DropSpans()))
    reader = PeriodicExportingMetricReader(_DropMetrics(), export_interval_millis=1000)
    return tracer_provider, MeterProvider(metric_readers=[reader])


async def _rate(fn: Any, n: int, *args: Any) -> float:
    gc.collect()
    t0 = perf()
    for _ in range(n):
        await fn(*args)
    return n / (perf() - t0)


async def measure(quick: bool) -> list[dict[str, Any]]:
    n = 20_000 if quick else 100_000
    rounds = 1 if quick else 3
    results: dict[str, list[float]] = {}
    held: dict[str, list[float]] = {}
    async with keyhive.InstanceManager("bench-otel", Counter, idle_timeout=3600, storage=None) as m:
        ref = await m.get("w1")
        for _ in range(rounds):
            results.setdefault("off", []).append(await _rate(m.call, n, "w1", "incr"))
            held.setdefault("off", []).append(await _rate(ref.call, n, "incr"))
            for label, sampled in (("on", True), ("on, not sampled", False)):
                tp, mp = _providers(sampled)
                inst = instrument(m, tracer_provider=tp, meter_provider=mp)
                results.setdefault(label, []).append(await _rate(m.call, n, "w1", "incr"))
                held.setdefault(label, []).append(await _rate(ref.call, n, "incr"))
                inst.uninstrument()
                tp.shutdown()  # their export threads stop: CPU time counts every thread
                mp.shutdown()
            results.setdefault("off again", []).append(await _rate(m.call, n, "w1", "incr"))
    off = statistics.median(results["off"])
    rows = []
    for label, runs in results.items():
        value = statistics.median(runs)
        rows.append({"workload": "W3 manager.call(key) (sequential)", "otel": label, "value": value,
                     "unit": "calls/s", "n": n, "runs": runs, "ratio_to_off": value / off})
    held_off = statistics.median(held["off"])
    for label, runs in held.items():
        value = statistics.median(runs)
        rows.append({"workload": "W3 call, held ref (sequential)", "otel": label, "value": value,
                     "unit": "calls/s", "n": n, "runs": runs, "ratio_to_off": value / held_off})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.otel", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N, one round")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.quick))
    print(f"{'workload':38} {'otel':16} {'calls/s':>12} {'x off':>7}")
    for r in rows:
        print(f"{r['workload']:38} {r['otel']:16} {r['value']:12,.0f} {r['ratio_to_off']:7.2f}")
    on = next(r for r in rows if r["otel"] == "on" and r["workload"].startswith("W3 manager.call"))
    ok = on["ratio_to_off"] >= TARGET
    print(f"target: on >= {TARGET}x off: {'PASS' if ok else 'MISS'} ({on['ratio_to_off']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "target": TARGET, "pass": ok}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

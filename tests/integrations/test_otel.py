"""keyhive.integrations.otel: spans and metrics, on the SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs opentelemetry-sdk (keyhive[test])")

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import keyhive
from keyhive.integrations.otel import instrument
from keyhive.testing import EventRecorder, FaultyStorage

from ..agents import Counter


class Telemetry:
    """An SDK tracer provider and meter provider that keep everything in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("test")

    def instrument(self, manager: keyhive.InstanceManager, **kwargs: Any) -> Any:
        return instrument(manager, tracer_provider=self.tracer_provider,
                          meter_provider=self.meter_provider, **kwargs)

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def span(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

    def points(self, metric: str, manager: str | None = None) -> list[Any]:
        data = self.reader.get_metrics_data()
        points = []
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        points.extend(p for p in m.data.data_points
                                      if manager is None or p.attributes.get("keyhive.manager") == manager)
        return points

    def value(self, metric: str, manager: str, **attrs: Any) -> Any:
        found = [p.value for p in self.points(metric, manager)
                 if all(p.attributes.get(k) == v for k, v in attrs.items())]
        assert len(found) == 1, (metric, found)
        return found[0]

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    telemetry.shutdown()


@pytest.fixture
async def running(make_manager: Any) -> AsyncIterator[Callable[..., Awaitable[keyhive.InstanceManager]]]:
    """Build and start managers (``make_manager``'s options); close them at the end."""
    started: list[keyhive.InstanceManager] = []

    async def factory(*args: Any, **kwargs: Any) -> keyhive.InstanceManager:
        m = make_manager(*args, **kwargs)
        await m.start()
        started.append(m)
        return m

    yield factory
    for m in reversed(started):
        await m.close()


def _parent(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


class Traced(keyhive.Agent):
    """Opens a span of its own in its handler, before or after suspending."""

    async def handle(self, message: Any) -> Any:
        tracer = trace.get_tracer("test", tracer_provider=self.opts["tracer_provider"])
        if message == "sync":
            with tracer.start_as_current_span("handler"):
                return "done"
        if message == "suspended":
            await asyncio.sleep(0)
            with tracer.start_as_current_span("handler"):
                await asyncio.sleep(0)
                return "done"
        if message == "boom":
            raise ValueError("bad message")
        return None


async def test_get_span_has_the_key_and_a_thaw_child(otel: Telemetry, running: Any) -> None:
    """A get that activates a key is a keyhive.get span with the key, whose child is keyhive.thaw."""
    m = await running(partition="tenant-a")
    otel.instrument(m)
    await m.get("k1")
    get, thaw = otel.span("keyhive.get"), otel.span("keyhive.thaw")
    assert get.attributes == {"keyhive.manager": m.name, "keyhive.key": "k1", "keyhive.partition": "tenant-a"}
    assert _parent(thaw) == get.context.span_id
    assert thaw.context.trace_id == get.context.trace_id
    assert thaw.attributes["keyhive.thawed"] is False
    await m.call("k1", "incr")  # a turn: the stop writes a checkpoint
    await m.stop("k1")
    otel.exporter.clear()
    await m.get("k1")
    assert otel.span("keyhive.thaw").attributes["keyhive.thawed"] is True


async def test_record_keys_false_leaves_keys_out(otel: Telemetry, running: Any) -> None:
    """With record_keys=False, no span carries the key."""
    m = await running()
    otel.instrument(m, record_keys=False)
    await m.call(("user", 7), "incr")
    assert all("keyhive.key" not in s.attributes for s in otel.spans())
    assert otel.span("keyhive.call").attributes["keyhive.manager"] == m.name


async def test_a_tuple_key_is_shown_as_its_repr(otel: Telemetry, running: Any) -> None:
    """A key that is not a str or an int appears on spans as its repr."""
    m = await running()
    otel.instrument(m)
    await m.call(("user", 7), "incr")
    assert otel.span("keyhive.call").attributes["keyhive.key"] == "('user', 7)"


async def test_call_span_and_latency_histogram(otel: Telemetry, running: Any) -> None:
    """manager.call makes a keyhive.call span and records one call-duration point per call."""
    m = await running()
    otel.instrument(m)
    for _ in range(3):
        assert await m.call("k", "incr") in (1, 2, 3)
    calls = otel.spans("keyhive.call")
    assert len(calls) == 3
    assert all(s.status.status_code is StatusCode.UNSET for s in calls)
    (point,) = otel.points("keyhive.call.duration", m.name)
    assert point.count == 3 and point.sum > 0
    assert "error.type" not in point.attributes


async def test_a_failed_call_is_recorded_on_its_span(otel: Telemetry, running: Any) -> None:
    """A handler's exception sets the call span's status to ERROR, with the exception as an event."""
    m = await running()
    otel.instrument(m)
    with pytest.raises(RuntimeError, match="boom"):
        await m.call("k", "boom")
    span = otel.span("keyhive.call")
    assert span.status.status_code is StatusCode.ERROR
    (event,) = span.events
    assert event.name == "exception" and event.attributes["exception.type"] == "RuntimeError"
    (point,) = otel.points("keyhive.call.duration", m.name)
    assert point.attributes["error.type"] == "RuntimeError"


@pytest.mark.parametrize("message", ["sync", "suspended"])
async def test_the_handler_span_is_a_child_of_the_call(otel: Telemetry, running: Any,
                                                       message: str) -> None:
    """A span the handler opens is a child of keyhive.call, on the fast path and after suspending."""
    m = await running(Traced, agent_opts={"tracer_provider": otel.tracer_provider})
    otel.instrument(m)
    await m.get("k")  # activation out of the way: the call below takes the fast path
    with otel.tracer.start_as_current_span("request") as request:
        assert await m.call("k", message) == "done"
    call, handler = otel.span("keyhive.call"), otel.span("handler")
    assert _parent(call) == request.get_span_context().span_id
    assert _parent(handler) == call.context.span_id
    assert handler.context.trace_id == request.get_span_context().trace_id


async def test_stop_span_holds_the_hibernate_and_its_write(otel: Telemetry, running: Any) -> None:
    """manager.stop is a keyhive.stop span; its hibernate and the batched write are its descendants."""
    m = await running()
    otel.instrument(m)
    await m.call("k", "incr")
    await m.stop("k")
    stop, hib, save = (otel.span(n) for n in ("keyhive.stop", "keyhive.hibernate",
                                              "keyhive.storage.save_batch"))
    assert _parent(hib) == stop.context.span_id
    assert _parent(save) == hib.context.span_id
    assert hib.attributes["keyhive.stop_reason"] == "stopped"
    assert hib.attributes["keyhive.batch_size"] == 1 and hib.attributes["keyhive.failed"] == 0
    assert save.attributes["keyhive.batch_size"] == 1
    ops = {p.attributes["keyhive.storage.operation"]: p.count
           for p in otel.points("keyhive.storage.duration", m.name)}
    assert ops == {"load": 1, "save_batch": 1}


async def test_a_failed_stop_is_recorded(otel: Telemetry, running: Any) -> None:
    """A stop whose write fails marks the stop, hibernate and write spans as errors."""
    storage = FaultyStorage()
    m = await running(storage=storage)
    otel.instrument(m)
    await m.call("k", "incr")
    storage.fail_save = True
    with pytest.raises(keyhive.StorageError):
        await m.stop("k")
    for name in ("keyhive.stop", "keyhive.hibernate", "keyhive.storage.save_batch"):
        assert otel.span(name).status.status_code is StatusCode.ERROR, name
    assert otel.span("keyhive.hibernate").attributes["keyhive.failed"] == 1
    assert otel.value("keyhive.agent.failures", m.name, **{"keyhive.failure": "hibernate_failed"}) == 1
    storage.heal()


@pytest.mark.looptime
async def test_idle_hibernation_is_a_root_span_per_batch(otel: Telemetry, running: Any) -> None:
    """Agents that idle out hibernate in a root keyhive.hibernate span per batch, not under a call."""
    m = await running(idle_timeout=60)
    otel.instrument(m)
    events = EventRecorder(m)
    with otel.tracer.start_as_current_span("request"):
        for key in ("a", "b", "c"):
            await m.call(key, "incr")
    for key in ("a", "b", "c"):
        await events.wait_for("hibernated", key)
    hibs = otel.spans("keyhive.hibernate")
    assert sum(s.attributes["keyhive.batch_size"] for s in hibs) == 3
    assert all(s.parent is None and s.attributes["keyhive.stop_reason"] == "idle_timeout" for s in hibs)
    assert otel.value("keyhive.agent.hibernations", m.name) == 3
    assert otel.value("keyhive.agents.live", m.name) == 0


async def test_lifecycle_counters_and_live_gauge(otel: Telemetry, running: Any) -> None:
    """Activations, thaws, hibernations, stops and the live gauge follow what the manager did."""
    m = await running()
    otel.instrument(m)
    for key in ("a", "b"):
        await m.call(key, "incr")
    assert otel.value("keyhive.agents.live", m.name) == 2
    await m.stop("a")
    assert otel.value("keyhive.agents.live", m.name) == 1
    await m.call("a", "incr")  # thawed
    await m.call("c", "incr")
    assert otel.value("keyhive.agents.live", m.name) == len(await m.agents()) == 3
    assert otel.value("keyhive.agent.activations", m.name) == 4
    assert otel.value("keyhive.agent.thaws", m.name) == 1
    assert otel.value("keyhive.agent.hibernations", m.name) == 1
    assert otel.value("keyhive.agent.stops", m.name) == 1
    assert otel.value("keyhive.agent.evictions", m.name) == 0
    assert otel.value("keyhive.agent.failures", m.name, **{"keyhive.failure": "thaw_failed"}) == 0


async def test_a_failed_thaw_is_counted_and_recorded(otel: Telemetry, running: Any) -> None:
    """A checkpoint that cannot be loaded fails the get and thaw spans and counts a thaw failure."""
    storage = FaultyStorage()
    m = await running(storage=storage)
    otel.instrument(m)
    storage.fail_load = True
    with pytest.raises(keyhive.ThawError):
        await m.get("k")
    assert otel.span("keyhive.get").status.status_code is StatusCode.ERROR
    thaw = otel.span("keyhive.thaw")
    assert thaw.status.status_code is StatusCode.ERROR
    assert thaw.events[0].attributes["exception.type"] == "keyhive.ThawError"
    assert otel.value("keyhive.agent.failures", m.name, **{"keyhive.failure": "thaw_failed"}) == 1
    assert otel.value("keyhive.agent.activations", m.name) == 0


async def test_instrument_before_start(otel: Telemetry) -> None:
    """Instrumenting a manager that has not started yet also traces its thaws and hibernates."""
    m = keyhive.InstanceManager("otel-before-start", Counter, storage=keyhive.MemoryStorage())
    otel.instrument(m)
    async with m:
        await m.call("k", "incr")
        await m.stop("k")
    names = {s.name for s in otel.spans()}
    assert {"keyhive.get", "keyhive.thaw", "keyhive.call", "keyhive.stop", "keyhive.hibernate",
            "keyhive.storage.save_batch"} <= names


async def test_close_drain_is_traced(otel: Telemetry) -> None:
    """Close's drain hibernates the live agents in a root keyhive.hibernate span (shutdown)."""
    m = keyhive.InstanceManager("otel-drain", Counter, storage=keyhive.MemoryStorage())
    otel.instrument(m)
    async with m:
        await m.call("k", "incr")
    (hib,) = otel.spans("keyhive.hibernate")
    assert hib.attributes["keyhive.stop_reason"] == "shutdown" and hib.parent is None
    assert otel.value("keyhive.agents.live", m.name) == 0


async def test_two_managers_on_one_meter_provider(otel: Telemetry, running: Any) -> None:
    """Every instrumented manager of one meter provider reports its own points."""
    m1, m2 = await running(), await running()
    otel.instrument(m1)
    otel.instrument(m2)
    await m1.call("a", "incr")
    for key in ("a", "b"):
        await m2.call(key, "incr")
    assert otel.value("keyhive.agent.activations", m1.name) == 1
    assert otel.value("keyhive.agent.activations", m2.name) == 2
    assert otel.value("keyhive.agents.live", m2.name) == 2


async def test_uninstrument_puts_the_manager_back(otel: Telemetry, running: Any) -> None:
    """After uninstrument the manager runs its own methods again and reports nothing."""
    m = await running()
    plain = {name: vars(m).get(name) for name in ("get", "call", "stop", "start")}
    inst = otel.instrument(m)
    assert "call" in vars(m) and "save_batch" in vars(m._core.io) and "hibernate" in vars(m._core.reaper)
    with pytest.raises(ValueError, match="instrumented already"):
        otel.instrument(m)
    inst.uninstrument()
    inst.uninstrument()  # idempotent
    assert {name: vars(m).get(name) for name in plain} == plain == dict.fromkeys(plain)
    assert not {"thaw", "load", "save_batch"} & set(vars(m._core.io))
    assert "hibernate" not in vars(m._core.reaper)
    await m.call("k", "incr")
    await m.stop("k")
    assert otel.spans() == []
    assert otel.points("keyhive.agent.activations", m.name) == []
    again = otel.instrument(m)  # allowed once undone
    await m.call("k", "incr")
    assert len(otel.spans("keyhive.call")) == 1
    again.uninstrument()


def test_instrument_refuses_what_is_not_a_manager() -> None:
    """instrument() of something else says what it takes."""
    with pytest.raises(TypeError, match=r"keyhive\.InstanceManager"):
        instrument(object())  # type: ignore[arg-type]


def test_import_keyhive_does_not_import_opentelemetry() -> None:
    """``import keyhive`` (and building a manager) loads nothing of OpenTelemetry."""
    code = ("import sys, keyhive\n"
            "class A(keyhive.Agent):\n"
            "    async def handle(self, message): return message\n"
            "keyhive.InstanceManager('m', A, storage=None)\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]"


class SpanAcrossAwait(keyhive.Agent):
    """Holds a span open across its first suspension (``with span: await ...``)."""

    async def handle(self, message: Any) -> Any:
        tracer = trace.get_tracer("test", tracer_provider=self.opts["tracer_provider"])
        with tracer.start_as_current_span("handler"):
            await asyncio.sleep(0)
        return "done"


async def test_a_handler_span_may_stay_open_across_a_suspension(otel: Telemetry, running: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A handler span opened before its first await and closed after it detaches cleanly."""
    m = await running(SpanAcrossAwait, agent_opts={"tracer_provider": otel.tracer_provider})
    otel.instrument(m)
    await m.get("k")
    with otel.tracer.start_as_current_span("request"):
        assert await m.call("k", "x") == "done"
        with otel.tracer.start_as_current_span("after"):
            pass
    # what works already: the parents, and the caller's context after the call
    assert _parent(otel.span("handler")) == otel.span("keyhive.call").context.span_id
    assert _parent(otel.span("after")) == otel.span("request").context.span_id
    assert "Failed to detach context" not in caplog.text


async def test_the_documented_metrics_and_spans_are_the_ones_made(otel: Telemetry, running: Any) -> None:
    """docs/observability.md's span and metric tables name exactly what an instrumented manager makes."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "observability.md").read_text()
    spans_doc, metrics_doc = doc.split("## Metrics")
    documented_spans = set(re.findall(r"^\| `(keyhive\.[a-z_.]+)` \|", spans_doc, re.M))
    documented_metrics = set(re.findall(r"^\| `(keyhive\.[a-z_.]+)` \|", metrics_doc.split("## Prometheus")[0], re.M))
    m = await running()
    otel.instrument(m)
    await m.call("k", "incr")
    await m.stop("k")
    await m.get("k")
    data = otel.reader.get_metrics_data()
    made = {metric.name for rm in data.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics}
    assert documented_metrics == made
    assert documented_spans == {s.name for s in otel.spans()}


async def test_a_restarted_manager_stays_instrumented(otel: Telemetry, tmp_path: Any) -> None:
    """A manager started again after close (new storage connection, new reaper) is still traced."""
    m = keyhive.InstanceManager("otel-restart", Counter, storage=f"sqlite:///{tmp_path / 'a.db'}")
    otel.instrument(m)
    async with m:
        await m.call("k", "incr")
    otel.exporter.clear()
    async with m:
        assert await m.call("k", "incr") == 2
        await m.stop("k")
    thaw = otel.span("keyhive.thaw")
    assert thaw.attributes["keyhive.thawed"] is True
    assert otel.span("keyhive.hibernate").attributes["keyhive.stop_reason"] == "stopped"

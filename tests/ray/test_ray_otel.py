"""Trace context across the Ray runtime (SPEC §13): a client's span is the parent of the shard host's."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs opentelemetry-sdk (keyhive[test])")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import keyhive
from keyhive.integrations.otel import instrument

pytestmark = pytest.mark.timeout(180)

# -- what runs in the shard hosts (they import this module: tests/ is on their path) ----------

_host_provider: TracerProvider | None = None


def spans_file(manager: str) -> Path:
    """Where the shard hosts of ``manager`` write their finished spans, one JSON line each."""
    return Path(tempfile.gettempdir()) / f"keyhive-test-spans-{manager}.jsonl"


class _FileExporter(SpanExporter):
    """Appends each finished span (name, ids, parent) to a file the test reads back."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a") as out:
            for span in spans:
                ctx = span.get_span_context()
                assert ctx is not None
                out.write(json.dumps({
                    "name": span.name, "trace_id": ctx.trace_id, "span_id": ctx.span_id,
                    "parent": None if span.parent is None else span.parent.span_id,
                    "pid": os.getpid()}) + "\n")
        return SpanExportResult.SUCCESS


def setup_host(manager: keyhive.InstanceManager) -> None:
    """RayRuntime(host_setup=...): a tracer provider writing to spans_file, the local manager instrumented."""
    global _host_provider
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_FileExporter(spans_file(manager.name))))
    _host_provider = provider
    instrument(manager, tracer_provider=provider)


class Traced(keyhive.Agent):
    """Opens a ``handler`` span around its turn, across an await when told to suspend."""

    async def handle(self, message: Any) -> Any:
        provider = _host_provider or trace.get_tracer_provider()
        with provider.get_tracer("tests.ray").start_as_current_span("handler"):
            if message == "suspend":
                await asyncio.sleep(0.01)
            return os.getpid()


# -- the tests (the client side) ---------------------------------------------------------------


class Client:
    """A client-side tracer provider keeping its spans in memory, and the manager under test."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def host_spans(self, name: str, count: int) -> list[dict[str, Any]]:
        """The host's finished spans called ``name``, once ``count`` of them are there (10 s at most)."""
        path = spans_file(self.manager.name)
        deadline = time.monotonic() + 10
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            found = [row for row in map(json.loads, lines) if row["name"] == name]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture
async def client(ray_cluster: Any) -> AsyncIterator[Client]:
    from keyhive.ray import RayRuntime

    name = f"t-otel-{uuid.uuid4().hex[:8]}"
    manager = keyhive.InstanceManager(
        name, Traced, storage=None,
        runtime=RayRuntime(ray_cluster.address, shards=1, host_setup=f"{__name__}:setup_host"))
    await manager.start()
    try:
        yield Client(manager)
    finally:
        await manager.shutdown_hosts()
        spans_file(name).unlink(missing_ok=True)


@pytest.mark.parametrize("message", ["run", "suspend"])
async def test_call_continues_the_client_trace_in_the_shard_host(client: Client, message: str) -> None:
    """request -> keyhive.call (client) -> keyhive.call (host) -> handler: one trace, each the next's parent."""
    instrument(client.manager, tracer_provider=client.provider)
    with client.tracer.start_as_current_span("request") as request:
        host_pid = await client.manager.call("k", message)
    assert host_pid != os.getpid()
    (outer,) = client.spans("keyhive.call")
    trace_id = request.get_span_context().trace_id
    assert outer.context.trace_id == trace_id
    assert outer.parent is not None and outer.parent.span_id == request.get_span_context().span_id
    (host_call,) = client.host_spans("keyhive.call", 1)
    (handler,) = client.host_spans("handler", 1)
    assert host_call["pid"] == handler["pid"] == host_pid
    assert host_call["trace_id"] == handler["trace_id"] == trace_id
    assert host_call["parent"] == outer.context.span_id
    assert handler["parent"] == host_call["span_id"]


async def test_ref_call_of_an_uninstrumented_client_carries_its_current_span(client: Client) -> None:
    """ref.call from a client that is not instrumented still carries the caller's span to the handler."""
    ref = await client.manager.get("k")
    with client.tracer.start_as_current_span("request") as request:
        await ref.call("suspend")
        await ref.call("run")
    handlers = client.host_spans("handler", 2)
    assert len(handlers) == 2
    for handler in handlers:  # ref.call is not wrapped on the host: the client's span is the parent
        assert handler["trace_id"] == request.get_span_context().trace_id
        assert handler["parent"] == request.get_span_context().span_id


async def test_call_without_a_current_span_starts_a_trace_of_its_own_in_the_host(client: Client) -> None:
    """With no span current in the client, the host's keyhive.call is a root span of a new trace."""
    with client.tracer.start_as_current_span("earlier") as earlier:
        pass
    await client.manager.call("k", "run")
    (host_call,) = client.host_spans("keyhive.call", 1)
    (handler,) = client.host_spans("handler", 1)
    assert host_call["parent"] is None
    assert host_call["trace_id"] != earlier.get_span_context().trace_id
    assert handler["trace_id"] == host_call["trace_id"]


def failing_setup(manager: keyhive.InstanceManager) -> None:
    """A host_setup that fails (for the test below)."""
    raise LookupError("no exporter configured")


@pytest.mark.parametrize(("setup", "says"), [("no_such_setup", "no_such_setup"),
                                             ("failing_setup", "failing_setup.*no exporter configured")])
async def test_a_host_setup_that_is_missing_or_fails_fails_start_naming_it(ray_cluster: Any, setup: str,
                                                                           says: str) -> None:
    """A host_setup the shard host cannot find, or that raises, makes start() fail naming it."""
    from keyhive.ray import RayRuntime

    manager = keyhive.InstanceManager(
        f"t-otel-{uuid.uuid4().hex[:8]}", Traced, storage=None,
        runtime=RayRuntime(ray_cluster.address, shards=1, host_setup=f"{__name__}:{setup}"))
    try:
        with pytest.raises(keyhive.KeyhiveError, match=says):
            await manager.start()
    finally:
        import ray

        # the host was made before its setup failed: kill it, no restart
        ray.kill(ray.get_actor(f"keyhive:{manager.name}:0", namespace="keyhive"), no_restart=True)


@pytest.mark.parametrize("value", ["setup", ":setup", "module:", 42])
def test_host_setup_must_name_module_and_function(value: Any) -> None:
    """RayRuntime(host_setup=...) that is not 'module:function' is refused, saying what to write."""
    from keyhive.ray import RayRuntime

    with pytest.raises(ValueError, match="'module:function'"):
        RayRuntime(host_setup=value)


def test_tracing_needs_no_opentelemetry_import() -> None:
    """keyhive.ray never imports OpenTelemetry itself: a client without it carries no trace context."""
    code = ("import sys, keyhive.ray, keyhive.ray._client as c\n"
            "print(c._trace_context(), any(m.startswith('opentelemetry') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split() == ["None", "False"]

"""OpenTelemetry for a keyhive manager, opt-in (``pip install 'keyhive[otel]'``, SPEC §13).

One call instruments one manager, before or after it starts::

    from keyhive.integrations.otel import instrument

    rooms = keyhive.InstanceManager("rooms", Room, storage="sqlite:///rooms.db")
    instrumentation = instrument(rooms)          # the global tracer and meter providers
    ...
    instrumentation.uninstrument()               # optional: back to the plain manager

**Off costs nothing.** Nothing here is imported by ``import keyhive``, and the manager's
code has no ``if enabled:`` check: instrumenting *wraps*. The manager's bound ``get``,
``call``, ``stop`` and ``start`` are shadowed by instance attributes, and so are the
``thaw``/``load``/``save_batch`` methods of its checkpoint I/O and the ``hibernate``
method of its reaper (``start`` wraps those again when it makes new ones). A manager
that was never instrumented runs exactly the code it runs without this module.

Spans (tracer ``keyhive``):

* ``keyhive.get``, ``keyhive.call``, ``keyhive.stop``: attributes ``keyhive.manager``,
  ``keyhive.key`` (unless ``record_keys=False``) and ``keyhive.partition`` (when set);
  an exception is recorded on the span and sets its status to ERROR;
* ``keyhive.thaw``: a child of the ``keyhive.get`` that activates the key; attribute
  ``keyhive.thawed`` says whether a checkpoint was found;
* ``keyhive.hibernate``: one per batch, ``keyhive.batch_size``, ``keyhive.stop_reason``
  and ``keyhive.failed``; a child of ``keyhive.stop`` for ``manager.stop``, a root span
  for the reaper's batches (idle, evicted, self-stops) and for close's drain;
* ``keyhive.storage.save_batch``: ``keyhive.batch_size`` and ``keyhive.failed``.

The trace context follows a ``manager.call`` into the handler: a span the handler opens
is a child of ``keyhive.call``, whether the handler finishes without suspending (it runs
in the caller's task) or suspends (the rest of its turn runs in a task made with a copy
of the caller's context). ``ref.call`` on a held ref is not wrapped (refs have slots and
one class for every manager): a handler's spans are then children of whatever span is
current in the caller. Casts and calls whose caller left run with no caller's context.

Metrics (meter ``keyhive``; attribute ``keyhive.manager``, never a key):

* ``keyhive.agents.live`` (gauge): agents running or stopping;
* ``keyhive.agent.activations`` (every incarnation started, fresh or thawed),
  ``keyhive.agent.thaws``, ``keyhive.agent.hibernations``, ``keyhive.agent.evictions``,
  ``keyhive.agent.stops`` and ``keyhive.agent.failures`` (``keyhive.failure`` is
  ``thaw_failed``, ``hibernate_failed`` or ``lease_lost``): observable counters read from
  the manager's own counters at collection time, so they cost nothing between scrapes;
* ``keyhive.call.duration`` (s, ``error.type`` on failures) and
  ``keyhive.storage.duration`` (s, ``keyhive.storage.operation`` is ``load`` or
  ``save_batch``): histograms.

Across the Ray runtime the client's ``call``/``ref.call`` carry the trace context to the
shard host, whose spans continue the caller's trace; a host's own tracer provider and
``instrument(manager)`` go in ``RayRuntime(host_setup=...)`` (see docs/ray.md).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace import Span, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "keyhive.integrations.otel needs OpenTelemetry: pip install 'keyhive[otel]'"
    ) from exc

from .. import __version__
from .._events import StopReason
from .._manager import InstanceManager

if TYPE_CHECKING:
    from .._core import Core

__all__ = ["Instrumentation", "instrument"]

_SCOPE = "keyhive"
# Seconds: from a counter's turn (microseconds) to a storage write that times out.
_DURATION_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                     0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_now = time.perf_counter
_attach = otel_context.attach
_detach = otel_context.detach
_in_context = trace.set_span_in_context
_ROOT = otel_context.Context()  # the parent of spans of background work (the reaper's batches)
_MANAGER_METHODS = ("get", "call", "stop", "start")


def _key_value(key: Any) -> str | int:
    """A key as a span attribute: a str or an int as it is, anything else as its repr."""
    kind = type(key)
    return key if kind is str or kind is int else repr(key)


def _failed(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__qualname__}: {exc}"))


def _batch_failures(span: Span, failed: list[BaseException]) -> None:
    """A batch's failed items: counted on its span, the first recorded as its error."""
    span.set_attribute("keyhive.failed", len(failed))
    if failed:
        _failed(span, failed[0])


@contextlib.contextmanager
def _current(span: Span) -> Iterator[Span]:
    """``span`` is the current span inside the block; an exception is recorded on it; it
    ends with the block (a cancellation ends it too, without an error status)."""
    token = _attach(_in_context(span))
    try:
        yield span
    except Exception as exc:
        _failed(span, exc)
        raise
    finally:
        _detach(token)
        span.end()


class _Metrics:
    """The instruments of one meter provider, shared by every manager instrumented on it.

    A meter keeps the first instrument of each name, so observable instruments are made
    once and their callbacks report every instrumented manager of this provider.
    """

    def __init__(self, meter_provider: Any) -> None:
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        self.managers: dict[int, Instrumentation] = {}
        self.call_duration = _histogram(meter, "keyhive.call.duration",
                                        "Duration of manager.call, from the caller's side")
        self.storage_duration = _histogram(meter, "keyhive.storage.duration",
                                           "Duration of checkpoint loads and batched writes")
        meter.create_observable_gauge("keyhive.agents.live", [self._live], unit="{agent}",
                                      description="Agents running or stopping")
        counted = (
            ("keyhive.agent.activations", "Incarnations started, fresh or thawed", ("started", "thawed")),
            ("keyhive.agent.thaws", "Incarnations thawed from a checkpoint", ("thawed",)),
            ("keyhive.agent.hibernations", "Agents stopped with their checkpoint written", ("hibernated",)),
            ("keyhive.agent.evictions", "Agents hibernated to make room under max_live", ("evicted",)),
            ("keyhive.agent.stops", "Incarnations stopped, for any reason", ("stopped",)),
        )
        for name, description, fields in counted:
            meter.create_observable_counter(name, [self._counter(fields)], unit="{agent}",
                                            description=description)
        meter.create_observable_counter("keyhive.agent.failures", [self._failures], unit="{failure}",
                                        description="Thaws and hibernates that failed; leases lost")

    def _each(self) -> list[tuple[Core, dict[str, Any]]]:
        return [(inst.core, inst.metric_attrs) for inst in list(self.managers.values())]

    def _live(self, _options: Any) -> Iterable[metrics.Observation]:
        for core, attrs in self._each():
            c = core.counters
            # every incarnation that started is counted once when it stops (Reaper.finish)
            live = c["started"] + c["thawed"] - c["stopped"] if core.regs else 0
            yield metrics.Observation(max(live, 0), attrs)

    def _counter(self, fields: tuple[str, ...]) -> Callable[[Any], Iterable[metrics.Observation]]:
        def observe(_options: Any) -> Iterable[metrics.Observation]:
            for core, attrs in self._each():
                yield metrics.Observation(sum(core.counters[f] for f in fields), attrs)
        return observe

    def _failures(self, _options: Any) -> Iterable[metrics.Observation]:
        for core, attrs in self._each():
            c = core.counters
            for kind, field in (("thaw_failed", "thaw_failures"), ("hibernate_failed", "hibernate_failures"),
                                ("lease_lost", "lease_lost")):
                yield metrics.Observation(c[field], {**attrs, "keyhive.failure": kind})


def _histogram(meter: Any, name: str, description: str) -> Any:
    kwargs: dict[str, Any] = {"unit": "s", "description": description}
    if "explicit_bucket_boundaries_advisory" in inspect.signature(meter.create_histogram).parameters:
        kwargs["explicit_bucket_boundaries_advisory"] = list(_DURATION_BUCKETS)  # API >= 1.23
    return meter.create_histogram(name, **kwargs)


_instrumented: weakref.WeakKeyDictionary[InstanceManager, Instrumentation] = weakref.WeakKeyDictionary()
_metrics_lock = threading.Lock()
_metrics: dict[int, tuple[Any, _Metrics]] = {}  # id(meter provider) -> (provider, its instruments)


def _metrics_for(meter_provider: Any) -> _Metrics:
    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    with _metrics_lock:
        found = _metrics.get(id(provider))
        if found is None or found[0] is not provider:
            found = _metrics[id(provider)] = (provider, _Metrics(provider))
        return found[1]


class Instrumentation:
    """One instrumented manager: made (and installed) by :func:`instrument`."""

    def __init__(self, manager: InstanceManager, tracer: trace.Tracer, meters: _Metrics,
                 record_keys: bool) -> None:
        self.manager = manager
        self.core: Core = manager._core  # noqa: SLF001  # the manager's parts are what gets wrapped
        self._tracer = tracer
        self._meters = meters
        self._record_keys = record_keys
        self.metric_attrs: dict[str, Any] = {"keyhive.manager": manager.name}
        self._wrapped: list[tuple[object, str, Callable[..., Any]]] = []  # shadowed by us
        self.active = False
        self._install()

    # -- installing ---------------------------------------------------------------------------

    def _install(self) -> None:
        m = self.manager
        get, call, stop, start = m.get, m.call, m.stop, m.start
        self._shadow(m, "get", self._traced_get(get))
        self._shadow(m, "call", self._traced_call(call))
        self._shadow(m, "stop", self._traced_stop(stop))

        async def traced_start() -> None:
            await start()
            self._wrap_parts()  # start makes a new reaper (and, after a close, new I/O)

        self._shadow(m, "start", traced_start)
        self._wrap_parts()
        # a handler's span opened before an await and closed after it needs the whole turn in
        # one context (one copy per call; off unless instrumented)
        self.core.isolate()
        self._meters.managers[id(self)] = self
        self.active = True

    def uninstrument(self) -> None:
        """Put the manager back as it was: no spans, no metrics from it (idempotent)."""
        if not self.active:
            return
        self.active = False
        self._meters.managers.pop(id(self), None)
        for obj, name, fn in reversed(self._wrapped):
            if vars(obj).get(name) is fn:
                delattr(obj, name)
        self._wrapped.clear()
        if _instrumented.get(self.manager) is self:
            del _instrumented[self.manager]

    def _shadow(self, obj: object, name: str, fn: Callable[..., Any]) -> None:
        setattr(obj, name, fn)
        self._wrapped.append((obj, name, fn))

    def _ours(self, obj: object, name: str) -> bool:
        fn = vars(obj).get(name)
        return any(o is obj and n == name and f is fn for o, n, f in self._wrapped)

    def _wrap_parts(self) -> None:
        core = self.core
        io = core.io
        if not self._ours(io, "thaw"):
            self._shadow(io, "thaw", self._traced_thaw(io.thaw))
            self._shadow(io, "load", self._timed_load(io.load))
            self._shadow(io, "save_batch", self._traced_save(io.save_batch))
        reaper = core.reaper
        if reaper is not None and not self._ours(reaper, "hibernate"):
            self._shadow(reaper, "hibernate", self._traced_hibernate(reaper.hibernate))

    def _attrs(self, key: Any, partition: Any) -> dict[str, Any]:
        attrs: dict[str, Any] = {"keyhive.manager": self.manager.name}
        if self._record_keys:
            attrs["keyhive.key"] = _key_value(key)
        if partition is None:
            partition = self.manager.partition
        if partition is not None:
            attrs["keyhive.partition"] = _key_value(partition)
        return attrs

    # -- the manager's calls ------------------------------------------------------------------

    def _traced_get(self, get: Callable[..., Any]) -> Callable[..., Any]:
        start_span = self._tracer.start_span

        async def traced_get(key: Any, *, initial_state: Mapping[str, Any] | None = None,
                             partition: Any = None) -> Any:
            with _current(start_span("keyhive.get", attributes=self._attrs(key, partition))):
                return await get(key, initial_state=initial_state, partition=partition)

        return traced_get

    def _traced_call(self, call: Callable[..., Any]) -> Callable[..., Any]:
        start_span = self._tracer.start_span
        record = self._meters.call_duration.record
        ok_attrs = self.metric_attrs

        async def traced_call(key: Any, message: Any, *, timeout: float | None = 5.0,
                              partition: Any = None) -> Any:
            t0 = _now()
            attrs = ok_attrs
            try:
                with _current(start_span("keyhive.call", attributes=self._attrs(key, partition))):
                    return await call(key, message, timeout=timeout, partition=partition)
            except BaseException as exc:
                attrs = {**ok_attrs, "error.type": type(exc).__qualname__}
                raise
            finally:
                record(_now() - t0, attrs)

        return traced_call

    def _traced_stop(self, stop: Callable[..., Any]) -> Callable[..., Any]:
        start_span = self._tracer.start_span

        async def traced_stop(key: Any, *, partition: Any = None) -> None:
            with _current(start_span("keyhive.stop", attributes=self._attrs(key, partition))):
                await stop(key, partition=partition)

        return traced_stop

    # -- storage and hibernation --------------------------------------------------------------

    def _traced_thaw(self, thaw: Callable[..., Any]) -> Callable[..., Any]:
        start_span = self._tracer.start_span

        async def traced_thaw(ref: Any, agent: Any) -> tuple[bool, bytes]:
            with _current(start_span("keyhive.thaw", attributes=self._attrs(ref.key, ref.partition))) as span:
                thawed, meta = await thaw(ref, agent)
                span.set_attribute("keyhive.thawed", thawed)
                return thawed, meta

        return traced_thaw

    def _timed_load(self, load: Callable[..., Any]) -> Callable[..., Any]:
        record = self._meters.storage_duration.record
        attrs = {**self.metric_attrs, "keyhive.storage.operation": "load"}

        async def timed_load(skey: str) -> Any:
            t0 = _now()
            try:
                return await load(skey)
            finally:
                record(_now() - t0, attrs)

        return timed_load

    def _traced_save(self, save_batch: Callable[..., Any]) -> Callable[..., Any]:
        start_span = self._tracer.start_span
        record = self._meters.storage_duration.record
        attrs = {**self.metric_attrs, "keyhive.storage.operation": "save_batch"}

        async def traced_save(items: Sequence[Any], due: Sequence[float | None] | None = None, *,
                              timeout: float | None = None) -> list[int | BaseException]:
            span = start_span("keyhive.storage.save_batch",
                              attributes={**self.metric_attrs, "keyhive.batch_size": len(items)})
            t0 = _now()
            try:
                with _current(span):
                    results: list[int | BaseException] = await save_batch(items, due, timeout=timeout)
                    _batch_failures(span, [r for r in results if isinstance(r, BaseException)])
                    return results
            finally:
                record(_now() - t0, attrs)

        return traced_save

    def _traced_hibernate(self, hibernate: Callable[..., Any]) -> Callable[..., Any]:
        start_span = self._tracer.start_span

        async def traced_hibernate(refs: Sequence[Any], reason: StopReason, *,
                                   timeout: float | None = None) -> list[BaseException | None]:
            # manager.stop waits for its hibernate: its child. The reaper's batches and the
            # drain run in long-lived tasks whose context says nothing about these agents.
            parent = None if reason is StopReason.STOPPED else _ROOT
            span = start_span("keyhive.hibernate", context=parent, attributes={
                **self.metric_attrs, "keyhive.batch_size": len(refs), "keyhive.stop_reason": str(reason)})
            with _current(span):
                errors: list[BaseException | None] = await hibernate(refs, reason, timeout=timeout)
                _batch_failures(span, [e for e in errors if e is not None])
                return errors

        return traced_hibernate


def instrument(manager: InstanceManager, *, tracer_provider: Any = None, meter_provider: Any = None,
               record_keys: bool = True) -> Instrumentation:
    """Trace ``manager``'s get/call/stop, thaws, hibernates and writes; report its metrics.

    Works before or after ``start()``. ``tracer_provider`` / ``meter_provider`` default to
    OpenTelemetry's global ones; ``record_keys=False`` leaves keys out of span attributes
    (metrics never carry keys). Undo with :meth:`Instrumentation.uninstrument`.

    Raises:
        TypeError: ``manager`` is not a keyhive.InstanceManager.
        ValueError: ``manager`` is instrumented already (uninstrument it first).
    """
    if not isinstance(manager, InstanceManager):
        raise TypeError(f"instrument() takes a keyhive.InstanceManager, not {type(manager).__name__}")
    current = _instrumented.get(manager)
    if current is not None and current.active:
        raise ValueError(f"manager {manager.name!r} is instrumented already: call .uninstrument() on "
                         f"what instrument() returned before instrumenting it again")
    tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
    inst = _instrumented[manager] = Instrumentation(manager, tracer, _metrics_for(meter_provider),
                                                    record_keys)
    return inst

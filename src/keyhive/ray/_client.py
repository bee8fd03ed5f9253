"""The client side of the Ray runtime: ``RayManager`` and its remote refs.

Every process that builds the manager (every web worker) is a client: it holds handles on
the ``shards`` named shard-host actors and sends them operations. Operations to one shard
made in one loop iteration go as one batch (one Ray call); while ``_IN_FLIGHT`` batches
are on their way to a shard, new operations wait for the next batch, so a busy client
sends few, large batches instead of one round trip per message.

Subscriptions (``RemoteRef.subscribe``) are opened on the shard host by a batched
operation; their events come back through one long-poll ``pull`` per shard that has
subscriptions of this client (a task per shard, never per subscriber), each batch of a
subscription's events one codec payload. Overflow (on the host, or here when the reader
falls behind) and the end of the stream carry across.

Trace context: when OpenTelemetry is loaded in this process (``sys.modules``; never
imported here), ``call`` and ``ref.call`` inject the current context (the global
propagator: W3C ``traceparent``, and baggage) into a small dict that travels with the
operation; the shard host runs the call under the extracted context. Without a current
span nothing is added; without OpenTelemetry the cost is one ``sys.modules`` look-up.

``stored_keys`` / ``exists`` read the storage URL from this process (a backend opened
lazily, never creating a file or directory, closed by ``close``): no shard host is asked
and no agent is woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from .. import _manager as _core
from .._agent import Agent
from .._errors import AgentStopped, CodecError, KeyhiveError, ManagerClosed, SubscriberOverflow
from .._events import Event, EventKind, StopReason
from .._manager import InstanceManager, Stats
from .._stored import StoredRecord
from .._stored import exists as _stored_exists
from .._stored import stored_keys as _stored_keys
from ..storage import from_url
from ._hash import shard_of
from ._wire import RemoteError, load_error

if TYPE_CHECKING:
    from . import RayRuntime

__all__ = ["RayManager", "RemoteRef", "RemoteSubscription"]

logger = logging.getLogger("keyhive")

_OMITTED: Any = _core._OMITTED  # the same "storage omitted" marker as the core
_IN_FLIGHT = 2  # batches on their way to one shard at once
_EVENT_POLL = 0.25  # seconds between polls of the shard hosts' lifecycle events
_PULL_WAIT = 0.5  # longest a pull of subscriptions' events waits on a host with nothing to say


def _ray() -> Any:
    import ray

    return ray


_propagate: Any = None  # opentelemetry.propagate, once OpenTelemetry is loaded in this process


def _trace_context() -> dict[str, str] | None:
    """The current trace context as W3C headers, or ``None`` (no OpenTelemetry, no span)."""
    global _propagate
    propagate = _propagate
    if propagate is None:
        if "opentelemetry" not in sys.modules:  # the cost when OpenTelemetry is absent
            return None
        try:
            import opentelemetry.propagate as propagate
        except ImportError:  # a partial install: carry nothing
            return None
        _propagate = propagate
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def _no_create(url: str) -> str:
    """``url`` with ``create=false`` for the backends that would otherwise make a file or directory."""
    if not url.lower().startswith(("sqlite:", "file:")):
        return url
    from urllib.parse import parse_qsl, urlencode

    base, _, query = url.partition("?")  # not urlunsplit: it would drop the empty host of sqlite:////abs
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "create"]
    return base + "?" + urlencode([*pairs, ("create", "false")])


def _dead_errors() -> tuple[type[BaseException], ...]:
    exc = _ray().exceptions
    return (exc.RayActorError, exc.ActorDiedError, exc.ActorUnavailableError)


class _Shard:
    """One shard host as seen from this client: its handle, its batch queue."""

    __slots__ = ("busy", "handle", "index", "instance", "mgr", "name", "puller", "queue", "scheduled",
                 "subs")

    def __init__(self, mgr: RayManager, index: int, name: str, handle: Any) -> None:
        self.mgr = mgr
        self.index = index
        self.name = name
        self.handle = handle
        self.instance: str | None = None
        self.queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.scheduled = False
        self.busy = 0
        self.subs: dict[int, RemoteSubscription] = {}  # this client's subscriptions on this host
        self.puller: asyncio.Task[None] | None = None

    def submit(self, op: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = self.mgr._loop
        assert loop is not None
        fut: asyncio.Future[Any] = loop.create_future()
        self.queue.append((op, fut))
        if not self.scheduled and self.busy < _IN_FLIGHT:
            if self.busy == 0:
                # an idle shard: send at once (a lone caller saves a loop iteration); what
                # comes next while this is in flight is coalesced below
                self.flush()
            else:
                self.scheduled = True
                loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        self.scheduled = False
        if not self.queue or self.busy >= _IN_FLIGHT:
            return
        batch, self.queue = self.queue, []
        try:
            pending = self.handle.batch.remote([op for op, _ in batch])
        except Exception as exc:  # noqa: BLE001  # the handle itself failed (Ray shut down)
            self.failed(batch, exc)
            return
        self.busy += 1
        loop = self.mgr._loop
        assert loop is not None

        # Ray completes the future in its own thread: hand the result to our loop. A
        # callback, not a task per batch (measured: ~0.1 ms less per lone call).
        def landed(done: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.landed, batch, done)

        pending.future().add_done_callback(landed)

    def landed(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]], done: Any) -> None:
        self.busy -= 1
        try:
            exc = done.exception()
            if exc is not None:
                self.failed(batch, exc)
                return
            instance, results = done.result()
            self.seen(instance)
            for (_, fut), (status, value) in zip(batch, results, strict=True):
                if status == 2:
                    self.mgr._core.spawn(self.collect(value, fut))
                elif fut.done():
                    continue
                elif status == 0:
                    fut.set_result(value)
                else:
                    fut.set_exception(load_error(value, f"shard host {self.name}"))
        finally:
            if self.queue and not self.scheduled:
                self.flush()

    def failed(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]], exc: BaseException) -> None:
        """A batch that got no results: in flight to a host that died, or Ray failed."""
        dead = isinstance(exc, _dead_errors())
        if dead:
            self.died(exc)
        for _, fut in batch:
            if fut.done():
                continue
            err: Exception = (AgentStopped(f"shard host {self.name} died with this call in flight")
                              if dead else KeyhiveError(f"shard host {self.name} failed: {exc!r}"))
            err.__cause__ = exc
            fut.set_exception(err)

    async def collect(self, ticket: int, fut: asyncio.Future[Any]) -> None:
        try:
            status, value = await self.handle.collect.remote(ticket)
        except _dead_errors() as exc:
            self.died(exc)
            if not fut.done():
                err = AgentStopped(f"shard host {self.name} died with this call in flight")
                err.__cause__ = exc
                fut.set_exception(err)
            return
        if fut.done():
            return
        if status == 0:
            fut.set_result(value)
        else:
            fut.set_exception(load_error(value, f"shard host {self.name}"))

    def seen(self, instance: str) -> None:
        """A reply from ``instance``: when the host was restarted, its old refs are gone."""
        if instance != self.instance:
            old, self.instance = self.instance, instance
            if old is not None:
                self.mgr._incarnation_gone(self.index, lambda i: i != instance)

    def died(self, exc: BaseException) -> None:
        old, self.instance = self.instance, None
        logger.warning("keyhive: %s: shard host %s died: %r", self.mgr.name, self.name, exc)
        self.mgr._incarnation_gone(self.index, lambda i: old is None or i == old)


class _Owner:
    __slots__ = ("id", "refs")

    def __init__(self, ident: str) -> None:
        self.id = ident
        self.refs: set[RemoteRef] = set()


class RemoteRef:
    """A handle on one incarnation of one key's agent, served by a shard host.

    The same members as :class:`keyhive.AgentRef`; equal and hashable per incarnation.
    ``attachments`` and ``idle_deadline`` are as of the last ``manager.agents()``.
    """

    __slots__ = ("__weakref__", "_attachments", "_deadline", "_inst", "_key", "_mgr", "_n",
                 "_partition", "_shard", "_stop_reason", "_stopped")

    def __init__(self, mgr: RayManager, shard: int, instance: str, n: int, key: Any, partition: Any) -> None:
        self._mgr = mgr
        self._shard = shard
        self._inst = instance
        self._n = n
        self._key = key
        self._partition = partition
        self._stop_reason: StopReason | None = None
        self._stopped: asyncio.Event | None = None
        self._attachments = 0
        self._deadline: float | None = None

    @property
    def key(self) -> Any:
        """The key this incarnation serves."""
        return self._key

    @property
    def partition(self) -> Any:
        """The key's partition (``None`` when none)."""
        return self._partition

    @property
    def manager(self) -> str:
        """The name of the manager that runs it."""
        return self._mgr.name

    @property
    def alive(self) -> bool:
        """True until this incarnation is known to have stopped."""
        return self._stop_reason is None

    @property
    def stop_reason(self) -> StopReason | None:
        """``None`` while alive, else why it stopped (``LEASE_LOST``: its shard host died)."""
        return self._stop_reason

    @property
    def attachments(self) -> int:
        """Owners attached, as of the last ``manager.agents()``."""
        return self._attachments

    @property
    def idle_deadline(self) -> float | None:
        """This loop's time at which the agent idles out (as of the last ``manager.agents()``)."""
        return self._deadline

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemoteRef):
            return NotImplemented
        return (self._n == other._n and self._inst == other._inst
                and self._shard == other._shard and self._mgr.name == other._mgr.name)

    def __hash__(self) -> int:
        return hash((self._mgr.name, self._shard, self._inst, self._n))

    def __repr__(self) -> str:
        state = "alive" if self._stop_reason is None else f"stopped:{self._stop_reason}"
        part = "" if self._partition is None else f" partition={self._partition!r}"
        return (f"<RemoteRef {self._mgr.name}:{self._key!r}{part} shard={self._shard} "
                f"{self._inst}.{self._n} {state}>")

    def _mark_stopped(self, reason: str | StopReason | None) -> None:
        if self._stop_reason is not None:
            return
        try:
            self._stop_reason = StopReason(reason or StopReason.STOPPED)
        except ValueError:
            self._stop_reason = StopReason.STOPPED
        if self._stopped is not None:
            self._stopped.set()
        for owner in list(self._mgr._owners.values()):
            owner.refs.discard(self)

    async def _send(self, op: tuple[Any, ...], timeout: float | None = None) -> Any:
        if self._stop_reason is not None:
            raise AgentStopped(f"{self!r} has stopped")
        try:
            return await self._mgr._submit(self._shard, op, timeout)
        except AgentStopped as exc:
            self._mark_stopped(getattr(exc, "stop_reason", StopReason.LEASE_LOST))
            raise

    async def call(self, message: Any, *, timeout: float | None = 5.0) -> Any:
        """Run ``handle(message)`` in the agent's turn (on its shard host) and return the reply.

        Raises:
            CodecError: the message (or the reply) is not encodable by the codec.
            AgentStopped: this incarnation has stopped, or its shard host died.
            TimeoutError: no reply within ``timeout`` seconds.
            Exception: whatever ``handle`` raised (rebuilt here); the agent keeps running.
        """
        codec = self._mgr._options.codec
        data = codec.encode(message)
        reply = await self._send(("rcall", self._inst, self._n, data, timeout, _trace_context()), timeout)
        return codec.decode(reply)

    async def cast(self, message: Any) -> None:
        """Queue ``message`` for ``handle``; returns once the shard host has queued it.

        Raises:
            CodecError: the message is not encodable.
            AgentStopped: this incarnation has stopped.
        """
        data = self._mgr._options.codec.encode(message)
        await self._send(("rcast", self._inst, self._n, data))

    async def state(self) -> Any:
        """A snapshot of the agent's state, taken in its turn (decoded from the codec's bytes)."""
        data = await self._send(("state", self._inst, self._n))
        return self._mgr._options.codec.decode(data, self._mgr.agent.state_type)

    async def attach(self, owner: object = None) -> None:
        """Attach ``owner`` (default: the current task); renewed by this process every
        ``owner_ttl / 3`` and dropped by the shard host ``owner_ttl`` after the last renewal.

        Raises:
            AgentStopped: this incarnation has stopped.
        """
        if owner is None:
            owner = _current_task("attach")
        mgr = self._mgr
        entry = mgr._owner(owner)
        await self._send(("attach", self._inst, self._n, entry.id, mgr._runtime.owner_ttl))
        if self not in entry.refs:
            entry.refs.add(self)
            if isinstance(owner, asyncio.Task) and len(entry.refs) == 1:
                owner.add_done_callback(mgr._owner_done)

    async def detach(self, owner: object = None) -> None:
        """Detach ``owner`` (default: the current task); not attached: nothing happens."""
        if owner is None:
            owner = _current_task("detach")
        mgr = self._mgr
        entry = mgr._owners.get(owner)
        if entry is None or self not in entry.refs:
            return
        entry.refs.discard(self)
        if not entry.refs:
            del mgr._owners[owner]
            if isinstance(owner, asyncio.Task):
                owner.remove_done_callback(mgr._owner_done)
        if self._stop_reason is None:
            with contextlib.suppress(AgentStopped):
                await self._send(("detach", self._inst, self._n, entry.id))

    def subscribe(self, *, snapshot: bool = False) -> RemoteSubscription:
        """``async with ref.subscribe() as events``: the events this incarnation publishes.

        As :meth:`keyhive.AgentRef.subscribe`: the subscription is an owner on the shard
        host while open (renewed by this process's pulls, dropped ``owner_ttl`` after this
        process stops pulling); ``events.snapshot`` with ``snapshot=True``; the stream ends
        when the incarnation stops (``events.stop_reason``), and raises
        :class:`~keyhive.SubscriberOverflow` when more than ``subscriber_buffer`` events
        were waiting for this reader, on the host or here. Events must be encodable by the
        codec: one that is not ends the stream with :class:`~keyhive.CodecError`.
        """
        return RemoteSubscription(self, snapshot=snapshot)

    def touch(self) -> None:
        """Restart the idle timer when nothing is attached (sent; not awaited)."""
        if self._stop_reason is not None or not self._mgr.running:
            return
        fut = self._mgr._shards[self._shard].submit(("touch", self._inst, self._n))
        fut.add_done_callback(_ignore_result)

    async def wait_stopped(self) -> StopReason:
        """Wait until this incarnation has stopped; return why."""
        if self._stop_reason is None:
            mgr = self._mgr
            fut = mgr._shards[self._shard].submit(("wait", self._inst, self._n))
            try:
                self._mark_stopped(await fut)
            except AgentStopped as exc:
                self._mark_stopped(getattr(exc, "stop_reason", StopReason.LEASE_LOST))
        assert self._stop_reason is not None
        return self._stop_reason


class RemoteSubscription:
    """``async with remote_ref.subscribe() as events: async for event in events: ...``."""

    __slots__ = ("_error", "_events", "_limit", "_overflowed", "_ref", "_sid", "_waiter",
                 "_want_snapshot", "snapshot", "stop_reason")

    def __init__(self, ref: RemoteRef, *, snapshot: bool) -> None:
        self._ref = ref
        self._want_snapshot = snapshot
        self._limit: int = ref._mgr._options.subscriber_buffer
        self._events: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._overflowed = False
        self._error: BaseException | None = None
        self._sid: int | None = None
        self.snapshot: Any = None
        self.stop_reason: StopReason | None = None

    def __repr__(self) -> str:
        return f"<RemoteSubscription to {self._ref!r}, {len(self._events)} buffered>"

    @property
    def ended(self) -> bool:
        """Whether the stream has ended (stopped, overflowed, failed, or closed)."""
        return self.stop_reason is not None or self._overflowed or self._error is not None

    @property
    def overflowed(self) -> bool:
        """Whether this subscriber fell more than ``subscriber_buffer`` events behind (dropped)."""
        return self._overflowed

    async def __aenter__(self) -> RemoteSubscription:
        if self._sid is not None:
            raise RuntimeError(f"{self!r} was entered already: call ref.subscribe() for another one")
        ref = self._ref
        mgr = ref._mgr
        sid, data = await ref._send(("sub", ref._inst, ref._n, mgr._client, self._want_snapshot,
                                     mgr._runtime.owner_ttl))
        self._sid = sid
        if data is not None:
            self.snapshot = mgr._options.codec.decode(data, mgr.agent.state_type)
        mgr._subscribed(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        ref = self._ref
        mgr = ref._mgr
        if self._sid is None:
            return
        shard = mgr._shards[ref._shard] if mgr._shards else None
        if shard is not None and shard.subs.pop(self._sid, None) is not None and mgr.running:
            with contextlib.suppress(AgentStopped, ManagerClosed):
                await mgr._submit(ref._shard, ("unsub", mgr._client, self._sid))

    def __aiter__(self) -> RemoteSubscription:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._events:
                return self._events.popleft()
            if self._overflowed:
                raise SubscriberOverflow(
                    f"subscriber of {self._ref!r} fell more than {self._limit} events behind and was "
                    f"dropped (raise subscriber_buffer, or consume faster)")
            if self._error is not None:
                raise self._error
            if self.stop_reason is not None:
                raise StopAsyncIteration
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deliver(self, events: list[Any]) -> None:
        """Events pulled from the host, in publish order."""
        if self.ended:
            return
        self._events.extend(events)
        if len(self._events) > self._limit:  # the reader here fell behind: dropped, as on a host
            self._events.clear()
            self._overflowed = True
            self._ref._mgr._unsubscribe_later(self)
        self._wake()

    def _end(self, kind: str, value: Any) -> None:
        """The stream ended on the host (or its host died)."""
        if kind == "overflow":
            self._overflowed = True
        elif kind == "codec":
            self._error = CodecError(value)
        else:
            try:
                reason = StopReason(value)
            except ValueError:
                reason = StopReason.STOPPED
            self.stop_reason = reason
            if kind == "stop":
                self._ref._mark_stopped(reason)
        self._wake()


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _current_task(what: str) -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError(f"{what}() without an owner must run inside an asyncio task")
    return task


class RayManager(InstanceManager):
    """An :class:`keyhive.InstanceManager` whose agents run in Ray shard-host actors.

    Built by ``InstanceManager(name, Agent, ..., runtime=RayRuntime(...))``; the options
    are those of the local manager and are passed to each shard host's local manager.
    ``storage`` must be a URL (or ``None``): every shard host opens it itself.
    """

    def __init__(self, name: str, agent: type[Agent], *, runtime: RayRuntime,
                 storage: Any = _OMITTED, **options: Any) -> None:
        # The local constructor validates every option (and sets name, agent, partition,
        # codec); its registry and timers are never used here.
        super().__init__(name, agent, storage=None, **options)
        if storage is _OMITTED:
            storage = "memory://"
        elif storage is not None and not isinstance(storage, str):
            raise TypeError(
                "with RayRuntime, storage must be a URL such as 'sqlite:///agents.db' or "
                "'postgresql://...', or None: each shard host opens it in its own process; "
                f"got {type(storage).__name__}"
            )
        if storage is not None:
            from_url(storage)  # validates the URL now (constructed, never connected)
        self._url: str | None = storage
        self._runtime = runtime
        # every host knows the shard count: its timer poller fires only its own keys' timers
        self._host_options: dict[str, Any] = {**options, "storage": storage, "_shards": runtime.shards}
        if self._host_options.get("agent_opts") is not None:
            self._host_options["agent_opts"] = dict(self._host_options["agent_opts"])
        self._listeners: tuple[Callable[[Event], None], ...] = ()
        self._client = uuid.uuid4().hex[:12]
        self._shards: list[_Shard] = []
        self._refs: weakref.WeakValueDictionary[tuple[int, str, int], RemoteRef] = (
            weakref.WeakValueDictionary())
        self._latest: weakref.WeakValueDictionary[tuple[Any, Any], RemoteRef] = (
            weakref.WeakValueDictionary())
        self._owners: dict[object, _Owner] = {}
        self._owner_seq = 0
        self._renewer: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._ray_state = "new"
        self._reader: Any = None  # the storage as stored_keys/exists read it, opened on first use

    def __repr__(self) -> str:
        return (f"<RayManager {self.name!r} agent={self.agent.__name__} "
                f"shards={self._runtime.shards} {self._ray_state}>")

    @property
    def storage(self) -> Any:
        """The storage URL every shard host opens (``None``: hibernate/thaw off)."""
        return self._url

    @property
    def running(self) -> bool:
        """Whether this client is started and not closed."""
        return self._ray_state == "running"

    @property
    def shards(self) -> int:
        """How many shard hosts serve this manager."""
        return self._runtime.shards

    # -- start and close -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Ray (``ray.init`` when not yet done) and reach every shard host,
        creating the ones that do not exist yet.

        Raises:
            ValueError: another running manager in this process has the same name.
        """
        if self._ray_state == "running":
            return
        if self.name in _core._running:  # one manager per name per process
            raise ValueError(f"a manager named {self.name!r} is already running in this process")
        ray = _ray()
        rt = self._runtime
        if not ray.is_initialized():
            ray.init(address=rt.address, namespace=rt.namespace, ignore_reinit_error=True,
                     log_to_driver=False)
        from ._host import ShardHost

        remote_host = ray.remote(ShardHost)
        self._loop = asyncio.get_running_loop()
        shards = []
        for i in range(rt.shards):
            actor_name = f"keyhive:{self.name}:{i}"
            opts: dict[str, Any] = {
                "name": actor_name, "namespace": rt.namespace, "get_if_exists": True,
                "lifetime": "detached", "max_restarts": -1, "max_task_retries": 0,
                "max_concurrency": rt.max_concurrency, "num_cpus": 0, **rt.actor_options,
            }
            handle = remote_host.options(**opts).remote(self.name, self.agent, i, self._host_options,
                                                        rt.host_setup)
            shards.append(_Shard(self, i, actor_name, handle))
        self._shards = shards
        try:
            infos = await asyncio.gather(*(s.handle.info.remote() for s in shards))
        except Exception as exc:
            self._shards = []
            raise KeyhiveError(
                f"the shard hosts of {self.name!r} could not start: {exc!r}. The cluster's workers "
                f"must be able to import {self.agent.__module__} (PYTHONPATH, or "
                f"RayRuntime(actor_options={{'runtime_env': ...}}))"
            ) from exc
        for shard, info in zip(shards, infos, strict=True):
            shard.instance = info["instance"]
        if not infos[0]["lease_hooks"]:
            logger.info("keyhive: %s: this keyhive has no shard leases yet (InstanceManager "
                        "takes no _shard/_takeover): a shard host does not fence a dead "
                        "predecessor's writes", self.name)
        self._ray_state = "running"
        _core._running[self.name] = self  # keyhive.get_manager(name) finds it
        self._renewer = self._core.spawn(self._renew_loop())
        if self._listeners:
            self._poller = self._core.spawn(self._poll_events())

    async def __aenter__(self) -> RayManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Detach this process's owners and disconnect; the shard hosts and their agents
        stay up for the other processes (``shutdown_hosts`` stops them). Closes the storage
        that ``stored_keys``/``exists`` opened."""
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):  # a reader's failure to close loses nothing
                await reader.aclose()
        if self._ray_state != "running":
            return
        self._ray_state = "closed"
        if _core._running.get(self.name) is self:
            del _core._running[self.name]
        if self._renewer is not None:
            self._renewer.cancel()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for shard in self._shards:  # the streams end here; the hosts drop them on "unsub"
            if shard.puller is not None:
                shard.puller.cancel()
                shard.puller = None
            for sid, sub in list(shard.subs.items()):
                sub._end("closed", StopReason.SHUTDOWN)
                fut = shard.submit(("unsub", self._client, sid))
                fut.add_done_callback(_ignore_result)
            shard.subs.clear()
        detaches = []
        for entry in list(self._owners.values()):
            for ref in list(entry.refs):
                if ref._stop_reason is None:
                    fut = self._shards[ref._shard].submit(("detach", ref._inst, ref._n, entry.id))
                    detaches.append(fut)
        self._owners.clear()
        if detaches:
            await asyncio.wait(detaches, timeout=2.0)
            for fut in detaches:
                if fut.done():
                    _ignore_result(fut)
        pending = [t for t in self._core.tasks if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for task in pending:
            task.cancel()

    aclose = close

    async def shutdown_hosts(self) -> None:
        """Hibernate every agent on every shard host, then kill the hosts (no restart).

        For operators and tests: every client of this manager loses its agents.
        """
        ray = _ray()
        self._check_running()
        shards = self._shards
        await asyncio.gather(*(s.handle.shutdown.remote() for s in shards), return_exceptions=True)
        for s in shards:
            with contextlib.suppress(Exception):
                ray.kill(s.handle, no_restart=True)
        await self.close()

    def _check_running(self) -> None:
        if self._ray_state != "running":
            raise ManagerClosed(f"manager {self.name!r} is not running ({self._ray_state})")

    # -- plumbing -----------------------------------------------------------------------

    async def _submit(self, shard: int, op: tuple[Any, ...], timeout: float | None = None) -> Any:
        self._check_running()
        fut = self._shards[shard].submit(op)
        if timeout is None:
            return await fut
        # A timeout cancels only this future: the operation was sent (or goes with the next
        # batch) and runs to completion on the host; its late result is dropped.
        async with asyncio.timeout(timeout):
            return await fut

    def _shard_of(self, key: Any, partition: Any) -> int:
        return shard_of(self.name, partition, key, self._runtime.shards)

    def _remote(self, shard: int, n: int, key: Any, partition: Any) -> RemoteRef:
        instance = self._shards[shard].instance or ""
        slot = (shard, instance, n)
        ref = self._refs.get(slot)
        if ref is None:
            ref = RemoteRef(self, shard, instance, n, key, partition)
            self._refs[slot] = ref
            with contextlib.suppress(TypeError):  # an unhashable key cannot be live anyway
                self._latest[(partition, key)] = ref
        return ref

    def _incarnation_gone(self, shard: int, which: Callable[[str], bool]) -> None:
        for (index, instance, _), ref in list(self._refs.items()):
            if index == shard and which(instance):
                ref._mark_stopped(StopReason.LEASE_LOST)

    def _subscribed(self, sub: RemoteSubscription) -> None:
        shard = self._shards[sub._ref._shard]
        assert sub._sid is not None
        shard.subs[sub._sid] = sub
        if shard.puller is None:
            shard.puller = self._core.spawn(self._pull_loop(shard))

    def _unsubscribe_later(self, sub: RemoteSubscription) -> None:
        """Drop ``sub`` here and on its host without waiting (it overflowed on this side)."""
        shard = self._shards[sub._ref._shard]
        if sub._sid is not None and shard.subs.pop(sub._sid, None) is not None and self.running:
            shard.submit(("unsub", self._client, sub._sid)).add_done_callback(_ignore_result)

    async def _pull_loop(self, shard: _Shard) -> None:
        """Long-poll one shard host for the events of this client's subscriptions there."""
        wait = min(_PULL_WAIT, self._runtime.owner_ttl / 3)
        codec = self._options.codec
        try:
            while self._ray_state == "running" and shard.subs:
                try:
                    instance, rows = await shard.handle.pull.remote(self._client, wait)
                except _dead_errors() as exc:
                    shard.died(exc)
                    instance, rows = None, []
                except Exception:  # Ray itself failing: try again (the host keeps the ttl)
                    logger.exception("keyhive: %s: pulling events from %s failed", self.name, shard.name)
                    await asyncio.sleep(wait)
                    continue
                if instance is not None:
                    shard.seen(instance)
                for sid, data, end in rows:
                    sub = shard.subs.get(sid)
                    if sub is None:
                        continue
                    if data is not None:
                        sub._deliver(codec.decode(data))
                    if end is not None:
                        shard.subs.pop(sid, None)
                        sub._end(*end)
                for sid, sub in list(shard.subs.items()):  # its incarnation is gone (host died)
                    reason = sub._ref._stop_reason
                    if reason is not None or instance is None:
                        del shard.subs[sid]
                        sub._end("gone", reason or StopReason.LEASE_LOST)
        finally:
            if shard.puller is asyncio.current_task():
                shard.puller = None

    def _owner(self, owner: object) -> _Owner:
        entry = self._owners.get(owner)
        if entry is None:
            self._owner_seq += 1
            entry = self._owners[owner] = _Owner(f"{self._client}:{self._owner_seq}")
        return entry

    def _owner_done(self, task: asyncio.Task[Any]) -> None:
        entry = self._owners.get(task)
        if entry is None or self._ray_state != "running":
            return
        for ref in list(entry.refs):
            self._core.spawn(ref.detach(task))

    async def _renew_loop(self) -> None:
        """Renew this process's owners and learn which known incarnations have stopped."""
        ttl = self._runtime.owner_ttl
        while self._ray_state == "running":
            await asyncio.sleep(ttl / 3)
            try:
                await self._renew_once(ttl)
            except Exception:  # Ray itself failing: keep trying, the hosts keep the ttl
                logger.exception("keyhive: %s: renewing owners failed", self.name)

    async def _renew_once(self, ttl: float) -> None:
        owners: list[list[str]] = [[] for _ in self._shards]
        incs: list[list[tuple[str, int]]] = [[] for _ in self._shards]
        for entry in self._owners.values():
            for shard in {ref._shard for ref in entry.refs}:
                owners[shard].append(entry.id)
        for (shard, instance, n), ref in list(self._refs.items()):
            if ref._stop_reason is None:
                incs[shard].append((instance, n))
        calls = [(s, s.handle.renew.remote(ttl, owners[s.index], incs[s.index]))
                 for s in self._shards if owners[s.index] or incs[s.index]]
        for host, call in calls:
            try:
                instance, stopped = await call
            except _dead_errors() as exc:
                host.died(exc)
                continue
            except Exception:
                logger.exception("keyhive: %s: renewing owners on %s failed", self.name, host.name)
                continue
            host.seen(instance)
            for inst, n, reason in stopped:
                known = self._refs.get((host.index, inst, n))
                if known is not None:
                    known._mark_stopped(reason)

    # -- the manager API -------------------------------------------------------------------

    async def get(self, key: Any, *, initial_state: Mapping[str, Any] | None = None,  # type: ignore[override]
                  partition: Any = None) -> RemoteRef:
        """The live agent for ``key`` (on its shard host): running, thawed or started fresh.

        Raises:
            ThawError: a checkpoint exists but cannot be restored; nothing was started.
            CodecError: ``initial_state`` is not encodable.
            AgentStopped: the shard host died while the get was in flight.
            TypeError, ValueError: the key is not a valid key.
            ManagerClosed: the manager is not running.
        """
        self._check_running()
        part = self.partition if partition is None else partition
        shard = self._shard_of(key, part)
        if initial_state is not None and not isinstance(initial_state, Mapping):
            raise TypeError(f"initial_state must be a mapping, not {type(initial_state).__name__}")
        data = None if initial_state is None else self._options.codec.encode(dict(initial_state))
        n = await self._submit(shard, ("get", key, part, data))
        return self._remote(shard, n, key, part)

    async def lookup(self, key: Any, *, partition: Any = None) -> RemoteRef | None:  # type: ignore[override]
        """The live agent for ``key``, or ``None``; never starts or thaws anything."""
        self._check_running()
        part = self.partition if partition is None else partition
        shard = self._shard_of(key, part)
        n = await self._submit(shard, ("lookup", key, part))
        return None if n is None else self._remote(shard, n, key, part)

    async def call(self, key: Any, message: Any, *, timeout: float | None = 5.0,
                   partition: Any = None) -> Any:
        """``get(key)`` then ``call(message)``, in one operation on the key's shard host.

        Raises:
            CodecError: the message (or the reply) is not encodable.
            AgentStopped: the shard host died with the call in flight (never retried).
            TimeoutError: no reply within ``timeout`` seconds.
        """
        self._check_running()
        part = self.partition if partition is None else partition
        shard = self._shard_of(key, part)
        codec = self._options.codec
        data = codec.encode(message)
        reply = await self._submit(shard, ("call", key, part, data, timeout, _trace_context()), timeout)
        return codec.decode(reply)

    @asynccontextmanager
    async def attach(self, key: Any, *, partition: Any = None) -> AsyncIterator[RemoteRef]:  # type: ignore[override]
        """``async with manager.attach(key) as ref``: the agent stays alive inside the block."""
        ref = await self.get(key, partition=partition)
        owner = object()
        await ref.attach(owner)
        try:
            yield ref
        finally:
            await ref.detach(owner)

    async def stop(self, key: Any, *, partition: Any = None) -> None:
        """Stop the agent for ``key``: when this returns, its checkpoint is written.

        Raises:
            NotFound: no live agent for ``key``.
            StorageError: the checkpoint could not be written; the agent keeps running.
        """
        self._check_running()
        part = self.partition if partition is None else partition
        shard = self._shard_of(key, part)
        await self._submit(shard, ("stop", key, part))
        ref = self._latest.get((part, key))
        if ref is not None:
            ref._mark_stopped(StopReason.STOPPED)

    async def stats(self, *, partition: Any = None) -> Stats:
        """Live agents of one partition (``count``, ``keys``) and in total, over all shards."""
        self._check_running()
        part = self.partition if partition is None else partition
        found = await asyncio.gather(*(s.handle.stats.remote(part) for s in self._shards),
                                     return_exceptions=True)
        keys: list[Any] = []
        total = attached = 0
        counters: dict[str, int] = {}
        down = 0
        for item in found:
            if isinstance(item, BaseException):
                down += 1
                continue
            keys.extend(item["keys"])
            total += item["total"]
            attached += item["attached"]
            for name, value in item["counters"].items():
                counters[name] = counters.get(name, 0) + value
        counters["shards"] = len(self._shards)
        counters["shards_down"] = down
        return Stats(count=len(keys), keys=keys, partition=partition, total=total, attached=attached,
                     registry_partitions=self.registry_partitions, running=self.running,
                     counters=counters)

    def _storage_reader(self) -> Any:
        """The storage as this process reads it for ``stored_keys``/``exists`` (lazily opened)."""
        reader = self._reader
        if reader is None:
            url = self._url
            assert url is not None
            if url.lower().startswith("memory:"):
                raise TypeError(
                    f"manager {self.name!r} runs on Ray with memory:// storage: its checkpoints "
                    "live inside each shard host's process, out of this process's reach. Give "
                    "stored_keys()/exists() a shared storage: storage='sqlite:///agents.db' (one "
                    "machine), 'postgresql://...' or 'redis://...'")
            reader = self._reader = from_url(_no_create(url))
        return reader

    def stored_keys(self, *, partition: Any = None) -> AsyncIterator[StoredRecord]:
        """``async for record in manager.stored_keys()``: this manager's stored checkpoints.

        As :meth:`keyhive.InstanceManager.stored_keys`, read from this process: the storage
        URL is opened here (never creating a database file or directory; closed by
        ``close()``); no shard host is asked, nothing is woken. A live agent's latest
        turns are there once its host has written them (its checkpoint policy).

        Raises:
            TypeError: the storage is ``memory://`` (each shard host's own memory), or it
                cannot list its keys.
            StorageError: the backend failed (e.g. no such database file); its exception
                is ``__cause__``.
        """
        if self._url is None:
            return super().stored_keys(partition=partition)
        part = self.partition if partition is None else partition
        return _stored_keys(self._storage_reader(), self.name, partition=part)

    async def exists(self, key: Any, *, partition: Any = None) -> bool:
        """Whether a checkpoint of ``key`` is stored, read from this process (see ``stored_keys``).

        Raises:
            TypeError, ValueError: a bad key or partition (as ``get`` would raise), or
                ``memory://`` storage.
            StorageError: the backend failed; its exception is ``__cause__``.
        """
        if self._url is None:
            return await super().exists(key, partition=partition)
        part = self.partition if partition is None else partition
        reader = self._storage_reader()
        async with asyncio.timeout(self._options.storage_timeout):
            return await _stored_exists(reader, self.name, part, key)

    async def agents(self) -> list[RemoteRef]:  # type: ignore[override]
        """Every live agent on every shard host (for dashboards and tools)."""
        self._check_running()
        found = await asyncio.gather(*(s.handle.agents.remote() for s in self._shards),
                                     return_exceptions=True)
        assert self._loop is not None
        now = self._loop.time()
        out: list[RemoteRef] = []
        for shard, item in zip(self._shards, found, strict=True):
            if isinstance(item, BaseException):
                continue
            instance, rows = item
            shard.seen(instance)
            for n, key, partition, attachments, idle_in in rows:
                ref = self._remote(shard.index, n, key, partition)
                ref._attachments = attachments
                ref._deadline = None if idle_in is None else now + idle_in
                out.append(ref)
        return out

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every lifecycle event on every shard host.

        Events are polled from the hosts every ``_EVENT_POLL`` seconds, so they arrive that
        late, stamped with this loop's time; ``error`` is a :class:`RemoteError` with the
        original's repr. Returns the unsubscribe function.
        """
        if not callable(callback):
            raise TypeError("subscribe() takes a callable")
        self._listeners = (*self._listeners, callback)
        if self.running and self._poller is None:
            self._poller = self._core.spawn(self._poll_events())

        def unsubscribe() -> None:
            listeners = list(self._listeners)
            if callback in listeners:
                listeners.remove(callback)
                self._listeners = tuple(listeners)

        return unsubscribe

    async def _poll_events(self) -> None:
        cursors: list[tuple[str | None, int | None]] = [(None, None)] * len(self._shards)
        while self._ray_state == "running" and self._listeners:
            try:
                found = await asyncio.gather(
                    *(s.handle.events.remote(cursors[s.index][1]) for s in self._shards),
                    return_exceptions=True)
            except Exception:  # Ray itself failing (submission): try again at the next poll
                logger.exception("keyhive: %s: polling events failed", self.name)
                found = [None] * len(self._shards)
            assert self._loop is not None
            for shard, item in zip(self._shards, found, strict=True):
                if item is None or isinstance(item, BaseException):
                    continue
                instance, seq, rows = item
                known, _ = cursors[shard.index]
                if known is not None and instance != known:  # restarted: its events from the start
                    cursors[shard.index] = (instance, 0)
                    continue
                cursors[shard.index] = (instance, seq)
                for _, kind, key, partition, reason, error in rows:
                    event = Event(EventKind(kind), self.name, key, partition, self._loop.time(),
                                  None if reason is None else StopReason(reason),
                                  None if error is None else RemoteError(error, "remote"))
                    for callback in self._listeners:
                        try:
                            callback(event)
                        except Exception:
                            logger.exception("keyhive: %s: event callback %r failed", self.name, callback)
            await asyncio.sleep(_EVENT_POLL)
        self._poller = None

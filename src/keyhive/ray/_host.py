"""The shard host: one Ray actor running a local InstanceManager for the keys of one shard.

Clients send it batches of operations (``batch``); it runs a batch's operations
concurrently on its local manager and answers with one list of results. An operation
still running after ``_BATCH_WAIT`` seconds (a slow handler, ``wait_stopped``) is left
running and answered through ``collect``, so that one slow turn never holds up the
replies of the rest of its batch.

Incarnations are named ``(instance, n)``: ``instance`` is fresh for every start of this
actor (a Ray restart is a new instance), ``n`` counts the incarnations it has handed out.
Attachments from clients are owner ids renewed by ``renew``; one not renewed within its
ttl is detached by the host's sweeper.

Subscriptions (``RemoteRef.subscribe``): the ``sub`` operation opens a local
subscription here (it is the owner) on behalf of a client. Each client long-polls
``pull`` once per shard for all of its subscriptions on that shard: it answers as soon as
one of them has events or has ended (or after ``wait`` seconds with nothing), each
subscription's events as one codec payload, in publish order. A client's subscriptions
that it stops pulling for longer than their ttl (a dead client process) are closed by the
sweeper, so they stop keeping their agents alive.

Trace context: a ``call``/``rcall`` operation may carry the client's W3C trace headers
(a small dict); the call then runs under the extracted OpenTelemetry context, so the
local manager's spans and the handler's are children of the client's span. The first
such call makes the local manager run turns in a context of their own (as an
instrumented manager does). ``RayRuntime(host_setup="module:function")`` is called once
here with the local manager before it starts: that is where a host's tracer provider and
exporter are set up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

from .._agent import Agent
from .._errors import AgentStopped, CodecError
from .._events import Event, EventKind, StopReason
from .._manager import InstanceManager
from .._pubsub import Subscription
from .._ref import AgentRef
from ._wire import dump_error

__all__ = ["ShardHost"]

logger = logging.getLogger("keyhive")

_BATCH_WAIT = 0.01  # seconds a batch waits for its slowest operation before deferring it
_SWEEP_EVERY = 0.1  # seconds between sweeps of expired owners
_KEEP_UNCOLLECTED = 60.0  # seconds a deferred result waits for a client that may be gone
_GONE_KEPT = 100_000  # stopped incarnations whose reasons are remembered for renewals
_EVENTS_KEPT = 10_000  # lifecycle events kept for clients that poll them (manager.subscribe)

Ok = tuple[int, Any]
# one subscription's news in a pull: (sid, codec payload of a list of events or None, end or None);
# end: ("stop", reason) | ("overflow", limit) | ("codec", message) | ("gone", reason)
Pulled = tuple[int, bytes | None, tuple[str, Any] | None]


class _Subscriber:
    """One client's subscriptions on this host, pulled together."""

    __slots__ = ("seen", "subs", "ttl", "waiter")

    def __init__(self, ttl: float) -> None:
        self.subs: dict[int, Subscription] = {}
        self.waiter: asyncio.Future[None] | None = None  # the pull waiting for news
        self.seen = time.monotonic()
        self.ttl = ttl


class ShardHost:
    """One shard of a Ray-run manager (``keyhive:{manager}:{shard}``)."""

    def __init__(self, name: str, agent: type[Agent], shard: int, options: Mapping[str, Any],
                 setup: str | None = None) -> None:
        self._name = name
        self._setup = setup
        self._isolated = False  # a call with a trace context arrived: turns run in their own context
        self._extract: Callable[[Mapping[str, str]], Any] | None = None
        self._attach: Callable[[Any], Any] | None = None
        self._detach: Callable[[Any], None] | None = None
        self._agent = agent
        self._shard = shard
        self._options = dict(options)
        self._instance = uuid.uuid4().hex[:12]
        self._mgr: InstanceManager | None = None
        self._starting: asyncio.Lock | None = None
        self._lease_hooks = False
        self._next = 0
        self._inc: dict[int, AgentRef] = {}
        self._num: dict[AgentRef, int] = {}
        self._by_key: dict[tuple[Any, Any], int] = {}
        self._gone: OrderedDict[int, str] = OrderedDict()
        self._owners: dict[str, dict[int, AgentRef]] = {}
        self._expiry: dict[str, float] = {}
        self._deferred: dict[int, asyncio.Task[Ok]] = {}
        self._tickets = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._events: deque[tuple[int, str, Any, Any, str | None, str | None]] = deque(maxlen=_EVENTS_KEPT)
        self._event_seq = 0
        self._recording = False  # set by the first events() call: no cost until someone subscribes
        self._subscribers: dict[str, _Subscriber] = {}
        self._sub_seq = 0

    # -- the local manager ------------------------------------------------------------

    async def _manager(self) -> InstanceManager:
        mgr = self._mgr
        if mgr is not None:
            return mgr
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._mgr is None:
                opts = dict(self._options)
                params = inspect.signature(InstanceManager.__init__).parameters
                if "_shard" in params and "_takeover" in params:
                    # lease (name, shard), taken over at once: Ray declared the old host dead
                    opts["_shard"] = self._shard
                    opts["_takeover"] = True
                    self._lease_hooks = True
                mgr = InstanceManager(self._name, self._agent, **opts)
                if self._setup is not None:
                    await self._run_setup(self._setup, mgr)
                await mgr.start()
                mgr.subscribe(self._on_event)
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
                self._mgr = mgr
        assert self._mgr is not None
        return self._mgr

    @staticmethod
    async def _run_setup(spec: str, mgr: InstanceManager) -> None:
        """Call ``RayRuntime(host_setup="module:function")`` with the local manager."""
        module_name, _, qualname = spec.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"host_setup {spec!r} cannot be found in the shard host: {exc!r} (the "
                               f"workers must be able to import {module_name})") from exc
        if not callable(found):
            raise TypeError(f"host_setup {spec!r} is not callable: it must be a function(manager)")
        try:
            result = found(mgr)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            raise RuntimeError(f"host_setup {spec!r} failed in the shard host: {exc!r}") from exc

    def _enter_trace(self, mgr: InstanceManager, carrier: Mapping[str, str]) -> Any:
        """Attach the client's trace context to this operation's task; the token, or ``None``."""
        if self._extract is None:
            try:
                from opentelemetry import context, propagate
            except ImportError:  # the client traces, this host's environment has no OpenTelemetry
                return None
            self._extract, self._attach, self._detach = propagate.extract, context.attach, context.detach
        assert self._attach is not None
        if not self._isolated:
            self._isolated = True
            mgr._core.isolate()  # a handler's span across an await needs its turn in one context
        return self._attach(self._extract(carrier))

    async def _traced(self, mgr: InstanceManager, carrier: Mapping[str, str], call: Any) -> Any:
        """Await ``call`` (a coroutine) under the trace context in ``carrier``."""
        try:
            token = self._enter_trace(mgr, carrier)
        except BaseException:
            call.close()  # never left un-awaited
            raise
        try:
            return await call
        finally:
            if token is not None:
                assert self._detach is not None
                self._detach(token)

    def _on_event(self, event: Event) -> None:
        if self._recording:
            self._event_seq += 1
            self._events.append((self._event_seq, str(event.kind), event.key, event.partition,
                                 None if event.reason is None else str(event.reason),
                                 None if event.error is None else repr(event.error)))
        if event.kind is EventKind.STOPPED:
            n = self._by_key.pop((event.partition, event.key), None)
            if n is not None:
                self._forget(n, event.reason)

    def _forget(self, n: int, reason: StopReason | None) -> None:
        ref = self._inc.pop(n, None)
        if ref is not None:
            self._num.pop(ref, None)
        gone = self._gone
        gone[n] = str(reason or StopReason.STOPPED)
        if len(gone) > _GONE_KEPT:
            gone.popitem(last=False)

    def _number(self, ref: AgentRef) -> int:
        """The incarnation number of a local ref, handed out on first sight."""
        n = self._num.get(ref)
        if n is not None:
            return n
        self._next += 1
        n = self._next
        if not ref.alive:  # stopped between the get and here
            self._gone[n] = str(ref.stop_reason or StopReason.STOPPED)
            return n
        self._inc[n] = ref
        self._num[ref] = n
        slot = (ref.partition, ref.key)
        old = self._by_key.get(slot)
        if old is not None and old != n:
            self._forget(old, self._inc[old].stop_reason if old in self._inc else None)
        self._by_key[slot] = n
        return n

    def _ref(self, instance: str, n: int) -> AgentRef:
        ref = self._inc.get(n) if instance == self._instance else None
        if ref is not None and ref.alive:
            return ref
        if instance != self._instance:
            reason = str(StopReason.LEASE_LOST)
        else:
            reason = self._gone.get(n) or str(ref.stop_reason if ref is not None else StopReason.STOPPED)
        exc = AgentStopped(f"agent incarnation {instance}.{n} of {self._name!r} has stopped ({reason})")
        exc.stop_reason = reason  # type: ignore[attr-defined]  # read by the client's RemoteRef
        raise exc

    # -- the remote methods -------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """Who this host is: ``instance``, ``pid``, ``shard``, whether lease hooks are in use."""
        await self._manager()
        return {"instance": self._instance, "pid": os.getpid(), "shard": self._shard,
                "lease_hooks": self._lease_hooks}

    async def batch(self, ops: list[tuple[Any, ...]]) -> tuple[str, list[Ok]]:
        """Run ``ops`` concurrently; one result each: ``(0, value)``, ``(1, error)`` or
        ``(2, ticket)`` (still running: ``collect(ticket)``)."""
        mgr = await self._manager()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._run(mgr, op)) for op in ops]
        # One loop iteration runs every task's first step: a turn that does not suspend is
        # done by then, and the common batch needs no wait (no timer, no waiter future).
        await asyncio.sleep(0)
        running = [task for task in tasks if not task.done()]
        if running:
            await asyncio.wait(running, timeout=_BATCH_WAIT)
        results: list[Ok] = []
        for task in tasks:
            if task.done():
                results.append(task.result())
                continue
            self._tickets += 1
            ticket = self._tickets
            self._deferred[ticket] = task
            task.add_done_callback(functools.partial(self._expire_later, ticket))
            results.append((2, ticket))
        return self._instance, results

    def _expire_later(self, ticket: int, _task: asyncio.Task[Ok]) -> None:
        asyncio.get_running_loop().call_later(_KEEP_UNCOLLECTED, self._deferred.pop, ticket, None)

    async def collect(self, ticket: int) -> Ok:
        """The result of an operation that outlasted its batch."""
        task = self._deferred.get(ticket)
        if task is None:
            return 1, dump_error(RuntimeError(f"no deferred result {ticket} (collected twice?)"))
        try:
            return await asyncio.shield(task)
        finally:
            self._deferred.pop(ticket, None)

    async def _run(self, mgr: InstanceManager, op: tuple[Any, ...]) -> Ok:
        try:
            return 0, await self._op(mgr, op)
        except Exception as exc:  # noqa: BLE001  # every error crosses back to its caller
            return 1, dump_error(exc)

    async def _op(self, mgr: InstanceManager, op: tuple[Any, ...]) -> Any:
        kind = op[0]
        codec = mgr._options.codec  # the manager's own codec, as the client uses it
        if kind == "call":
            _, key, partition, data, timeout, *trace = op  # trace: [] from an older client
            call = mgr.call(key, codec.decode(data), timeout=timeout, partition=partition)
            reply = await (self._traced(mgr, trace[0], call) if trace and trace[0] else call)
            return codec.encode(reply)
        if kind == "rcall":
            _, instance, n, data, timeout, *trace = op
            call = self._ref(instance, n).call(codec.decode(data), timeout=timeout)
            reply = await (self._traced(mgr, trace[0], call) if trace and trace[0] else call)
            return codec.encode(reply)
        if kind == "rcast":
            _, instance, n, data = op
            await self._ref(instance, n).cast(codec.decode(data))
            return None
        if kind == "get":
            _, key, partition, data = op
            initial = None if data is None else codec.decode(data)
            return self._number(await mgr.get(key, initial_state=initial, partition=partition))
        if kind == "lookup":
            _, key, partition = op
            ref = await mgr.lookup(key, partition=partition)
            return None if ref is None else self._number(ref)
        if kind == "stop":
            _, key, partition = op
            await mgr.stop(key, partition=partition)
            return None
        if kind == "state":
            _, instance, n = op
            return codec.encode(await self._ref(instance, n).state())
        if kind == "attach":
            _, instance, n, owner, ttl = op
            ref = self._ref(instance, n)
            await ref.attach(owner)
            self._owners.setdefault(owner, {})[n] = ref
            self._expiry[owner] = time.monotonic() + ttl
            return None
        if kind == "detach":
            _, instance, n, owner = op
            refs = self._owners.get(owner)
            ref = None if refs is None else refs.pop(n, None)
            if refs is not None and not refs:
                del self._owners[owner]
                self._expiry.pop(owner, None)
            if ref is not None:
                await ref.detach(owner)
            return None
        if kind == "touch":
            _, instance, n = op
            with contextlib.suppress(AgentStopped):
                self._ref(instance, n).touch()
            return None
        if kind == "sub":
            _, instance, n, client, snapshot, ttl = op
            return await self._subscribe(self._ref(instance, n), client, snapshot, ttl, codec)
        if kind == "unsub":
            _, client, sid = op
            entry = self._subscribers.get(client)
            sub = None if entry is None else entry.subs.pop(sid, None)
            if sub is not None:
                await sub.__aexit__(None, None, None)
            return None
        if kind == "wait":
            _, instance, n = op
            ref = self._inc.get(n) if instance == self._instance else None
            if ref is None:
                return self._gone.get(n, str(StopReason.LEASE_LOST))
            return str(await ref.wait_stopped())
        raise ValueError(f"unknown shard host operation {kind!r}")

    async def _subscribe(self, ref: AgentRef, client: str, snapshot: bool, ttl: float,
                         codec: Any) -> tuple[int, bytes | None]:
        sub: Subscription = ref.subscribe(snapshot=snapshot)
        await sub.__aenter__()
        try:
            data = codec.encode(sub.snapshot) if snapshot else None
        except BaseException:
            await sub.__aexit__(None, None, None)
            raise
        self._sub_seq += 1
        sid = self._sub_seq
        entry = self._subscribers.get(client)
        if entry is None:
            entry = self._subscribers[client] = _Subscriber(ttl)
        entry.ttl = ttl
        entry.seen = time.monotonic()
        entry.subs[sid] = sub
        if entry.waiter is not None:  # a pull is waiting: this one wakes it too
            sub.watch(entry.waiter)
        return sid, data

    async def pull(self, client: str, wait: float) -> tuple[str, list[Pulled]]:
        """News of ``client``'s subscriptions: at once when there is some, else within ``wait`` s."""
        entry = self._subscribers.get(client)
        if entry is None or not entry.subs:
            return self._instance, []
        entry.seen = time.monotonic()
        rows = await self._drain(entry)
        if not rows and wait > 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry.waiter = fut
            subs = list(entry.subs.values())
            for sub in subs:
                sub.watch(fut)
            try:
                await asyncio.wait([fut], timeout=wait)
            finally:
                entry.waiter = None
                for sub in subs:
                    sub.unwatch(fut)
            rows = await self._drain(entry)
        entry.seen = time.monotonic()
        return self._instance, rows

    async def _drain(self, entry: _Subscriber) -> list[Pulled]:
        """Take what every subscription of ``entry`` buffered; close the ones that ended."""
        codec = (await self._manager())._options.codec
        rows: list[Pulled] = []
        ended: list[int] = []
        for sid, sub in entry.subs.items():
            events = sub.take()
            end: tuple[str, Any] | None = None
            data: bytes | None = None
            if events:
                try:
                    data = codec.encode(events)
                except CodecError as exc:  # deliver what encodes, then end with the error
                    good: list[Any] = []
                    for event in events:
                        try:
                            codec.encode(event)
                        except CodecError:
                            break
                        good.append(event)
                    data = codec.encode(good) if good else None
                    end = ("codec", f"an event published by {sub._ref!r} cannot be encoded: {exc}")
            if end is None and sub.ended:
                end = (("overflow", sub._limit) if sub.overflowed
                       else ("stop", str(sub.stop_reason or StopReason.STOPPED)))
            if data is not None or end is not None:
                rows.append((sid, data, end))
            if end is not None:
                ended.append(sid)
        for sid in ended:
            await entry.subs.pop(sid).__aexit__(None, None, None)
        return rows

    async def renew(self, ttl: float, owners: list[str],
                    incs: list[tuple[str, int]]) -> tuple[str, list[tuple[str, int, str]]]:
        """Keep ``owners`` attached for ``ttl`` more seconds; report which ``incs`` stopped."""
        await self._manager()
        expiry = time.monotonic() + ttl
        for owner in owners:
            if owner in self._expiry:
                self._expiry[owner] = expiry
        stopped: list[tuple[str, int, str]] = []
        for instance, n in incs:
            if instance != self._instance:
                stopped.append((instance, n, str(StopReason.LEASE_LOST)))
                continue
            ref = self._inc.get(n)
            if ref is None or not ref.alive:
                stopped.append((instance, n, self._gone.get(n, str(StopReason.STOPPED))))
        return self._instance, stopped

    async def stats(self, partition: Any) -> dict[str, Any]:
        """The local manager's ``stats`` as plain data."""
        s = await (await self._manager()).stats(partition=partition)
        return {"count": s.count, "keys": s.keys, "total": s.total, "attached": s.attached,
                "counters": s.counters}

    async def agents(self) -> tuple[str, list[tuple[int, Any, Any, int, float | None]]]:
        """Every live agent: ``(n, key, partition, attachments, seconds until idle or None)``."""
        mgr = await self._manager()
        now = asyncio.get_running_loop().time()
        out = []
        for ref in await mgr.agents():
            if not ref.alive:
                continue
            deadline = ref.idle_deadline
            out.append((self._number(ref), ref.key, ref.partition, ref.attachments,
                        None if deadline is None else max(0.0, deadline - now)))
        return self._instance, out

    async def events(self, after: int | None) -> tuple[str, int, list[tuple[Any, ...]]]:
        """Lifecycle events numbered above ``after`` (``None``: none, just the current number)."""
        await self._manager()
        self._recording = True
        if after is None:
            return self._instance, self._event_seq, []
        return self._instance, self._event_seq, [e for e in self._events if e[0] > after]

    async def shutdown(self) -> None:
        """Hibernate every agent of this shard and close the local manager (before a kill)."""
        mgr = self._mgr
        if self._sweeper is not None:
            self._sweeper.cancel()
        if mgr is not None:
            await mgr.close()

    # -- owners ------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Detach owners whose client stopped renewing them (a dead client process)."""
        while True:
            await asyncio.sleep(_SWEEP_EVERY)
            now = time.monotonic()
            expired = [owner for owner, at in self._expiry.items() if at < now]
            for client, entry in list(self._subscribers.items()):
                if entry.waiter is None and entry.seen + entry.ttl < now:  # its client stopped pulling
                    del self._subscribers[client]
                    for sub in entry.subs.values():
                        await sub.__aexit__(None, None, None)
            for owner in expired:
                self._expiry.pop(owner, None)
                for ref in self._owners.pop(owner, {}).values():
                    try:
                        await ref.detach(owner)
                    except Exception:
                        logger.exception("keyhive: %s: detaching expired owner %s failed",
                                         self._name, owner)

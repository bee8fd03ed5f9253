"""Durable timers (SPEC §12): ``self.schedule`` / ``self.unschedule``, live firing, the poller.

**The table.** An incarnation's timers live in one :class:`AgentTimers` (``Rare.timers``,
made on the first ``schedule``): name -> :class:`Timer`. Due times are wall-clock
seconds since the epoch, which is what is stored; the message is kept as the codec's
bytes (encoded at ``schedule`` time, so an unencodable message fails there, and decoded
at each fire, so a handler sees the same value live and after a thaw).

**Durability.** The table rides in the checkpoint's ``meta`` section
(``{"timers": {name: [due, every, message, first]}}``) and its earliest due time goes to
the storage's due-time index with the same write (``due=``). There is no write of its
own: the next checkpoint write of the agent carries it (hibernate, the turn's commit
under ``checkpoint="turn"``, write-behind, ``self.checkpoint()``). The digest that
decides "unchanged, skip the write" covers the meta, so a turn that only schedules is a
change.

**Live agents.** A live agent with timers has one entry, at its earliest due time, in
its manager's heap, which holds one ``loop.call_at`` handle for the earliest of all (an
agent without timers costs nothing; stale entries are skipped, and dropped when the heap
is rebuilt). When it fires, due agents are taken ``_SLICE`` per loop iteration, so that
100,000 timers falling due at once never stall the loop; each gets one task that fires
its due timers one by one, each in a turn of its own (queued behind other messages, like
a cast). The loop clock and the wall clock are tied by one offset
per event loop, taken when the loop's first manager starts: a periodic timer fires at
``first + n * every`` exactly, never drifting, and after an outage an overdue timer
fires once, then moves to its next due time in the future (the missed ones skipped).

**Delivery is at least once.** A handler that raises is retried with the manager's
``retry_backoff`` up to ``timer_retries`` times, then the timer is dropped for that
due time (logged with the key, ``EventKind.TIMER_DROPPED``). A timer's entry moves on
only in the turn that handled it, so under ``checkpoint="turn"`` the state change and
the timer's progress are written together.

**Hibernated agents.** A poll of the manager's (a loop timer while idle) asks ``storage.due_keys`` every
``timer_poll`` seconds for keys due before the next poll, and ``get``s those that are
not live; the thaw re-arms their timers from the checkpoint (due ones fire at once).
The live agent's table is the truth: the poller never touches a live key, so a timer
is not fired twice. It runs only while the manager holds its lease (SPEC §10) and, in a
Ray shard host, wakes only its own shard's keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import heapq
import logging
import math
import time
import weakref
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from ._errors import (
    AgentStopped,
    CodecError,
    ManagerClosed,
    OwnedElsewhere,
    ThawError,
)
from ._events import EventKind
from ._keys import decode_storage_key, storage_prefix
from ._lifecycle import RUNNING, STOPPED, STOPPING
from ._ref import _CHAIN

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._core import Core
    from ._ref import AgentRef

__all__ = ["AgentTimers", "Timer", "TimerService", "schedule", "timer_part", "unschedule"]

logger = logging.getLogger("keyhive")

_EPS = 1e-6  # seconds: a handle the loop runs a hair early still finds its timer due
_SLICE = 256  # due agents started per loop iteration
_POLL_BATCH = 1000  # due_keys rows asked for first; doubled while a full page held live keys
_WAKE_PARALLEL = 2  # chunks of them in flight at once
_WAKE_CHUNK = 64  # agents thawed at once by the poller: a burst of activations stays ~2 ms
_STOPPING_RETRY = 0.05  # seconds: a timer found while its agent hibernates looks again then
_MAX_SLEEP = 3600.0  # seconds the poller sleeps at most when nothing is due (a safety net)
_FAR = 1e18  # an `until` later than any due time

_BASE = contextvars.Context()  # timer callbacks and fire tasks start from a copy: no caller's chain
_offsets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, float] = weakref.WeakKeyDictionary()


def wall_offset(loop: asyncio.AbstractEventLoop) -> float:
    """``time.time() - loop.time()``, taken once per event loop (the loop clock is the ticker)."""
    offset = _offsets.get(loop)
    if offset is None:
        offset = _offsets[loop] = time.time() - loop.time()
    return offset


class Timer:
    """One named timer: due time (wall clock), period, the encoded message, retry state."""

    __slots__ = ("attempts", "data", "due", "every", "first", "retry")

    def __init__(self, due: float, every: float | None, data: bytes, first: float) -> None:
        self.due = due
        self.every = every
        self.data = data
        self.first = first  # a periodic timer's phase: its due times are first + n * every
        self.attempts = 0  # failed deliveries of this due time
        self.retry: float | None = None  # wall time of the next retry (in memory only)

    def at(self) -> float:
        """When it fires next (a retry, or its due time)."""
        retry = self.retry
        return self.due if retry is None else retry

    def advance(self, now: float) -> bool:
        """This due time is done: move to the next one in the future; False for a one-shot."""
        every = self.every
        self.attempts = 0
        self.retry = None
        if every is None:
            return False
        n = math.floor((now - self.first) / every) + 1
        due = self.first + n * every
        while due <= now:  # float rounding
            n += 1
            due = self.first + n * every
        self.due = due
        return True


class AgentTimers:
    """The timers of one incarnation, where it is in the heap, and its meta bytes (cached)."""

    __slots__ = ("at", "firing", "meta", "table")

    def __init__(self) -> None:
        self.table: dict[str, Timer] = {}
        self.at: float | None = None  # wall time of its live entry in the manager's heap
        self.firing = False
        self.meta: bytes | None = None  # the encoded table, until it changes


# -- what a turn calls ----------------------------------------------------------------------------

def _seconds(value: object, what: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be seconds (int, float or timedelta) or, for when, a timezone-aware "
                        f"datetime; not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds, not {value!r}")
    return float(value)


def schedule(ref: AgentRef, name: str, when: Any, message: Any, every: Any) -> None:
    """``self.schedule(...)``: validate, encode the message, file the timer, arm it."""
    if type(name) is not str:
        raise TypeError(f"a timer's name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("a timer's name must not be empty, e.g. self.schedule('reminder', 60, 'remind')")
    host: Any = ref._host
    service: TimerService | None = host.timers
    if service is None or ref._status is STOPPED:
        raise AgentStopped(f"{ref!r} has stopped: it cannot schedule timers")
    if isinstance(when, datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(
                f"when={when!r} is a naive datetime: use a timezone-aware one, e.g. "
                f"datetime.now(timezone.utc) + timedelta(minutes=5), or seconds from now"
            )
        due = when.timestamp()
    else:
        due = service.wall() + _seconds(when, "when")
    period = None
    if every is not None:
        period = _seconds(every, "every")
        if period <= 0:
            raise ValueError(f"every must be a period > 0 seconds, or None for a one-shot timer; "
                             f"not {every!r}")
    try:
        data = service.encode(message)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"the message of timer {name!r} cannot be encoded: {exc!r}") from exc
    x = ref._rare()
    timers: AgentTimers | None = x.timers
    if timers is None:
        timers = x.timers = AgentTimers()
    timers.table[name] = Timer(due, period, data, due)
    timers.meta = None
    ref._dirty = True
    if ref._status is RUNNING:
        at = timers.at
        if at is None or at > due:
            service.arm(ref, timers, due)


def unschedule(ref: AgentRef, name: str) -> bool:
    """``self.unschedule(name)``: forget the timer; True when there was one."""
    if type(name) is not str:
        raise TypeError(f"a timer's name must be a str, not {type(name).__name__}")
    x = ref._x
    timers: AgentTimers | None = None if x is None else x.timers
    if timers is None or timers.table.pop(name, None) is None:
        return False
    timers.meta = None
    ref._dirty = True
    if not timers.table:
        timers.at = None  # its heap entry is stale now: an agent without timers holds nothing
    return True


# -- the checkpoint's part ------------------------------------------------------------------------

def timer_part(ref: AgentRef) -> tuple[bytes, float | None]:
    """``(meta, due)`` for ``ref``'s next checkpoint write: ``(b"", None)`` without timers."""
    x = ref._x
    timers: AgentTimers | None = None if x is None else x.timers
    if timers is None or not timers.table:
        return b"", None
    table = timers.table
    due = min(t.due for t in table.values())
    meta = timers.meta
    if meta is None:
        meta = timers.meta = orjson.dumps({"timers": {
            name: [t.due, None, _text(t.data)] if t.every is None
            else [t.due, t.every, _text(t.data), t.first]
            for name, t in table.items()
        }})
    return meta, due


def _text(data: bytes) -> Any:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"b": base64.b64encode(data).decode("ascii")}


def _bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and isinstance(value.get("b"), str):
        return base64.b64decode(value["b"], validate=True)
    raise ValueError(f"bad timer message {value!r}")


def restore(ref: AgentRef, meta: bytes) -> None:
    """Put the timers of a thawed checkpoint's ``meta`` back (before ``on_start`` runs).

    Raises:
        ThawError: the meta section is not what this module writes.
    """
    if not meta:
        return
    try:
        section = orjson.loads(meta)
        entries = section.get("timers") if isinstance(section, dict) else None
        if not entries:
            return
        table: dict[str, Timer] = {}
        for name, entry in entries.items():
            due, every, message = float(entry[0]), entry[1], _bytes(entry[2])
            every = None if every is None else float(every)
            first = float(entry[3]) if every is not None and len(entry) > 3 else due
            if not (math.isfinite(due) and (every is None or (math.isfinite(every) and every > 0))):
                raise ValueError(f"bad due time or period in timer {name!r}")
            table[name] = Timer(due, every, message, first)
    except Exception as exc:
        raise ThawError(f"the timers stored with key {ref.key!r} cannot be restored (left as they are): "
                        f"{exc!r}") from exc
    timers = AgentTimers()
    timers.table = table
    timers.meta = meta
    ref._rare().timers = timers


def stopped(ref: AgentRef, saved: bool) -> None:
    """The incarnation stopped: drop its loop handle; when its checkpoint (which keeps the
    timers) is written, tell the poller when it falls due."""
    x = ref._x
    timers: AgentTimers | None = None if x is None else x.timers
    if timers is None:
        return
    timers.at = None
    service: TimerService | None = ref._host.timers  # type: ignore[attr-defined]
    if saved and timers.table and service is not None:
        service.note(min(t.due for t in timers.table.values()))


# -- firing and polling ---------------------------------------------------------------------------

class TimerService:
    """One manager's timers: the clock, live firing, and the poller for hibernated agents."""

    def __init__(self, core: Core, wake: Callable[[Any, Any], Awaitable[Any]]) -> None:
        self.core = core
        loop = core.loop
        assert loop is not None
        self.loop = loop
        self.offset = wall_offset(loop)
        codec = core.options.codec
        self.encode = codec.encode
        self.decode = codec.decode
        self._wake = wake
        self._poll_task: asyncio.Task[None] | None = None  # a poll under way
        self._poll_handle: asyncio.TimerHandle | None = None  # the next poll
        self._noted = math.inf  # note()s that came during a poll
        self._waking: set[str] = set()
        self._failed: dict[str, tuple[int, float]] = {}  # storage key -> (attempts, next try, wall)
        self.next_poll = math.inf  # wall time of the poller's next look (inf: none runs)
        self._heap: list[tuple[float, int, AgentRef]] = []  # (wall time, seq, ref) of live agents
        self._seq = 0
        self._rebuild_at = 4096
        self._handle: asyncio.Handle | None = None
        self._handle_at = math.inf

    def wall(self) -> float:
        """Seconds since the epoch, by the loop's clock."""
        return self.loop.time() + self.offset

    # -- live agents ----------------------------------------------------------------------------

    def arm(self, ref: AgentRef, timers: AgentTimers, at: float) -> None:
        """File ``ref`` in the heap at wall time ``at`` (its older entry goes stale)."""
        timers.at = at
        self._seq += 1
        heap = self._heap
        heapq.heappush(heap, (at, self._seq, ref))
        if at < self._handle_at:
            self._set_handle(at)
        if len(heap) > self._rebuild_at:
            self._rebuild()

    def _set_handle(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle_at = at
        self._handle = self.loop.call_at(at - self.offset, self._tick, context=_BASE)

    def _rebuild(self) -> None:
        """Drop stale entries (an entry is live while its agent's ``at`` still names it)."""
        live = []
        for entry in self._heap:
            x = entry[2]._x
            timers = None if x is None else x.timers
            if timers is not None and timers.at == entry[0]:
                live.append(entry)
        heapq.heapify(live)
        self._heap = live
        self._rebuild_at = 2 * len(live) + 4096

    def _tick(self) -> None:
        """The heap's handle: start the due agents, ``_SLICE`` per loop iteration."""
        self._handle = None
        self._handle_at = math.inf
        heap = self._heap
        now = self.wall() + _EPS
        started = 0
        while heap and heap[0][0] <= now:
            at, _, ref = heapq.heappop(heap)
            x = ref._x
            timers: AgentTimers | None = None if x is None else x.timers
            if timers is None or timers.at != at:
                continue  # stale: moved, unscheduled or stopped since
            timers.at = None
            self._due(ref, timers)
            started += 1
            if started >= _SLICE and heap and heap[0][0] <= now:
                self._handle_at = -math.inf  # more are due: go on after the loop's other work
                self._handle = self.loop.call_soon(self._tick, context=_BASE)
                return
        if heap:
            self._set_handle(heap[0][0])

    def rearm(self, ref: AgentRef) -> None:
        """File ``ref`` at its earliest timer (after a thaw or a round of firing)."""
        x = ref._x
        timers: AgentTimers | None = None if x is None else x.timers
        if timers is None or timers.firing or not self.core.is_open:
            return
        if not timers.table:
            timers.at = None
            return
        self.arm(ref, timers, min(t.at() for t in timers.table.values()))

    def _due(self, ref: AgentRef, timers: AgentTimers) -> None:
        status = ref._status
        if status is STOPPED or timers.firing or not self.core.is_open:
            return
        if status is STOPPING:  # a hibernate is writing: if it fails, the agent runs on
            self.arm(ref, timers, self.wall() + _STOPPING_RETRY)
            return
        timers.firing = True
        ctx = _BASE.copy()
        ctx.run(_CHAIN.set, (ref,))  # the fire task holds ref's turn: calling itself is re-entrant
        task = self.loop.create_task(self._fire(ref, timers), context=ctx)
        tasks = self.core.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _fire(self, ref: AgentRef, timers: AgentTimers) -> None:
        """Fire ``ref``'s due timers, earliest first, each in a turn of its own."""
        core = self.core
        try:
            while core.is_open and ref._status is RUNNING:
                now = self.wall()
                due = [(t.at(), name) for name, t in timers.table.items() if t.at() <= now + _EPS]
                if not due:
                    break
                due.sort()
                for _, name in due:
                    if not await self._fire_one(ref, timers, name):
                        return
        finally:
            timers.firing = False
            if ref._status is RUNNING:
                self.rearm(ref)

    async def _fire_one(self, ref: AgentRef, timers: AgentTimers, name: str) -> bool:
        """One delivery in a turn of ``ref``'s; False when the agent is gone."""
        core = self.core
        try:
            await ref._acquire()
        except AgentStopped:
            return False
        if ref._status is not RUNNING or ref._agent is None:
            ref._release()
            return False
        try:
            entry = timers.table.get(name)
            now = self.wall()
            if entry is None or entry.at() > now + _EPS:  # unscheduled or replaced meanwhile
                ref._release()
                return True
            error: Exception | None = None
            try:
                message = self.decode(entry.data)
                if core.turn_timeout is None:
                    await ref._agent.handle(message)
                else:
                    async with asyncio.timeout(core.turn_timeout):
                        await ref._agent.handle(message)
            except Exception as exc:  # noqa: BLE001  # the handler's error is retried, then dropped, logged with the key
                error = exc
            if timers.table.get(name) is entry:  # the handler did not replace or unschedule it
                now = self.wall()
                if error is None:
                    if core.listeners:
                        core.emit(EventKind.TIMER_FIRED, ref)
                    self._done(timers, name, entry, now)
                else:
                    self._failed_delivery(ref, timers, name, entry, error, now)
            elif error is not None:
                logger.error("keyhive: %s: timer %r of key %r failed: %r", core.name, name, ref.key,
                             error, exc_info=error)
        except BaseException:
            ref._release()
            raise
        # the turn ends as every turn does: queue its write, release, wait until durable
        failed = await ref._close_turn(None)
        if failed is not None:  # the state stays in memory; the next write carries it
            logger.warning("keyhive: %s: write after timer %r of key %r failed: %r",
                           core.name, name, ref.key, failed)
        return True

    @staticmethod
    def _done(timers: AgentTimers, name: str, entry: Timer, now: float) -> None:
        if not entry.advance(now):
            del timers.table[name]
        timers.meta = None

    def _failed_delivery(self, ref: AgentRef, timers: AgentTimers, name: str, entry: Timer,
                         error: Exception, now: float) -> None:
        core = self.core
        entry.attempts += 1
        retries = core.options.timer_retries
        if entry.attempts > retries:
            logger.error("keyhive: %s: timer %r of key %r dropped after %d failed deliveries: %r",
                         core.name, name, ref.key, entry.attempts, error, exc_info=error)
            if core.listeners:
                core.emit(EventKind.TIMER_DROPPED, ref, error=error)
            self._done(timers, name, entry, now)
            return
        delay = core.options.backoff(entry.attempts)
        logger.warning("keyhive: %s: timer %r of key %r failed (attempt %d of %d), retry in %.1fs: %r",
                       core.name, name, ref.key, entry.attempts, retries + 1, delay, error)
        entry.retry = now + delay

    # -- hibernated agents: the poller ----------------------------------------------------------

    def start(self) -> None:
        """Start the poller (storage with a due-time index), or say why there is none."""
        core = self.core
        io = core.io
        if io.storage is None:
            return
        if not io.keeps_timers:
            logger.warning("keyhive: %s: storage %s has no due-time index (due_keys): timers of hibernated "
                           "agents fire only when the agent is next woken", core.name,
                           type(io.storage).__qualname__)
            return
        options = core.options
        if options.shard is not None and options.shards is None:
            return  # a shard host that does not know the shard count cannot tell its keys
        self._poll_due()  # at once: catch up on what fell due while nothing ran

    def close(self) -> None:
        """Close begins: stop polling and firing (the drain hibernates every agent)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._handle_at = -math.inf  # nothing is armed again
        self._heap = []
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        self.next_poll = math.inf
        if self._poll_task is not None:
            self._poll_task.cancel()  # a task of the manager's: close waits for it

    def note(self, due: float) -> None:
        """An agent hibernated with a timer due at ``due``: look at the index no later than needed."""
        at = due - self.core.options.timer_poll
        if self._poll_task is not None:
            self._noted = min(self._noted, at)  # the poll under way may have looked already
        elif at < self.next_poll:
            self._schedule_poll(at)

    # Poll every ``timer_poll`` while timers are due; when none is, wait (a loop timer, no
    # task) until the next one. An agent of ours that hibernates with timers calls note():
    # only the lease holder writes these checkpoints, so nothing else adds an earlier one.

    def _schedule_poll(self, at: float) -> None:
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        self.next_poll = at
        self._poll_handle = self.loop.call_at(at - self.offset, self._poll_due, context=_BASE)

    def _poll_due(self) -> None:
        self._poll_handle = None
        if self.core.is_open and self._poll_task is None:
            self._poll_task = self.core.spawn(self._poll_once())

    async def _poll_once(self) -> None:
        core = self.core
        interval = core.options.timer_poll
        nxt = self.wall() + interval
        try:
            lease = core.lease
            if lease is None or lease.held:
                try:
                    nxt = await self.poll()
                except (ManagerClosed, OwnedElsewhere):
                    pass
                except Exception as exc:  # noqa: BLE001  # storage down: try again at the next poll
                    logger.warning("keyhive: %s: polling due timers failed: %r", core.name, exc)
        finally:
            self._poll_task = None
            nxt, self._noted = min(nxt, self._noted), math.inf
            if core.is_open:
                self._schedule_poll(nxt)

    async def poll(self) -> float:
        """Wake every hibernated agent with a timer due before the next poll; return when to
        look next (wall time)."""
        core = self.core
        storage = core.io.storage
        options = core.options
        prefix = storage_prefix(core.name)
        until = self.wall() + options.timer_poll
        timeout = options.storage_timeout
        limit = _POLL_BATCH
        seen = 0
        in_flight: set[asyncio.Future[Any]] = set()
        while core.is_open:
            async with asyncio.timeout(timeout):
                rows = await storage.due_keys(prefix, until, limit)
            seen += len(rows)
            for start in range(0, len(rows), _WAKE_CHUNK):  # a slice at a time: the loop keeps running
                if not core.is_open:
                    break
                fresh = self._fresh(rows[start:start + _WAKE_CHUNK])
                if not fresh:
                    await asyncio.sleep(0)
                    continue
                if len(in_flight) >= _WAKE_PARALLEL:
                    _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                in_flight.add(asyncio.gather(*(self._wake_one(*item) for item in fresh)))
            if in_flight and len(rows) == limit:  # the next page must see these as live
                await asyncio.wait(in_flight)
                in_flight = set()
            if len(rows) < limit:
                break
            # a full page: live keys (their index entry is refreshed by their next write) may
            # hide later ones, so look further
            limit *= 2
        if in_flight:
            await asyncio.wait(in_flight)
        now = self.wall()
        if seen:
            return now + options.timer_poll
        async with asyncio.timeout(timeout):
            first = await storage.due_keys(prefix, _FAR, 1)
        if not first:
            return now + _MAX_SLEEP
        return min(max(float(first[0][1]) - options.timer_poll, now + options.timer_poll), now + _MAX_SLEEP)

    def _fresh(self, rows: list[tuple[str, float]]) -> list[tuple[str, Any, Any]]:
        core = self.core
        name = core.name
        options = core.options
        now = self.wall()
        failed = self._failed
        waking = self._waking
        out = []
        for skey, _due in rows:
            if skey in waking:
                continue
            if failed:
                held = failed.get(skey)
                if held is not None and held[1] > now:
                    continue
            try:
                manager, partition, key = decode_storage_key(skey)
            except ValueError:
                continue
            if manager != name:
                continue
            reg = core.regs.get(partition)
            if reg is not None and key in reg:
                continue  # live (or starting, stopping): its own table is the truth
            if options.shards is not None and options.shard is not None:
                from .ray._hash import shard_of

                if shard_of(name, partition, key, options.shards) != options.shard:
                    continue
            out.append((skey, partition, key))
        return out

    async def _wake_one(self, skey: str, partition: Any, key: Any) -> None:
        self._waking.add(skey)
        try:
            await self._wake(key, partition)
            self._failed.pop(skey, None)
        except (ManagerClosed, OwnedElsewhere):
            raise
        except Exception as exc:  # noqa: BLE001  # a failed thaw is logged by get; back off per key
            attempts = self._failed.get(skey, (0, 0.0))[0] + 1
            self._failed[skey] = (attempts, self.wall() + self.core.options.backoff(attempts))
            if len(self._failed) > 100_000:
                self._failed.clear()
            logger.warning("keyhive: %s: waking key %r for its timers failed (attempt %d): %r",
                           self.core.name, key, attempts, exc)
        finally:
            self._waking.discard(skey)

"""What you need to test your own agents: fault-injecting storage and event waiters.

* :class:`FaultyStorage` wraps any backend and fails, delays, tears, loses replies or
  serves stale reads on demand: every call, the next N calls, only some keys, or at
  random with a seeded rate. It counts what it did (``faults``) and what is in flight.
* :class:`EventRecorder` records a manager's lifecycle events; ``await
  recorder.wait_for("hibernated", key)`` returns as soon as that happened.

Recipe, on virtual time with the ``looptime`` pytest plugin (a 300 s idle timeout runs
in milliseconds; never sleep for real in a lifecycle test)::

    @pytest.mark.looptime
    async def test_my_agent_hibernates():
        storage = FaultyStorage()
        async with InstanceManager("t", MyAgent, idle_timeout=300, storage=storage) as m:
            events = EventRecorder(m)
            await m.call("k", "incr")                  # a message that changes the state
            await events.wait_for("hibernated", "k")   # 300 virtual seconds, no waiting
            assert storage.saves == 1
            storage.fail_save = True                   # storage down: nothing is lost
            await m.call("k", "incr")                  # thawed, changed again
            await events.wait_for("hibernate_failed", "k")
            assert (await m.lookup("k")) is not None   # kept alive, retried with backoff
            storage.fail_save = False
            await events.wait_next("hibernated", "k")  # the next retry saves it

The whole guide, with the faults and what to assert, is ``docs/testing.md``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ._events import Event, EventKind
from ._manager import InstanceManager
from .storage import Checkpoint, MemoryStorage, SaveItem, StoredKey

__all__ = ["EventRecorder", "FaultyStorage", "StorageFault"]

Setting = bool | int | BaseException


class StorageFault(ConnectionError):
    """The error :class:`FaultyStorage` raises when told to fail."""


class FaultyStorage:
    """A storage backend that fails, delays, tears writes or reads stale data on demand.

    It wraps a real backend (default: a fresh :class:`~keyhive.MemoryStorage`).

    Programmed faults, each ``False`` (off), ``True`` (every call), an int (the next N
    calls) or, for the ``fail_*`` ones, an exception instance to raise every time:

    * ``fail_load`` / ``fail_save`` / ``fail_delete``: the call raises
      :class:`StorageFault` (a ``ConnectionError``) and does nothing;
    * ``torn_saves``: the write stores a truncated copy of the bytes and reports
      success, as a crash in the middle of a non-atomic write would;
    * ``stale_loads``: the load returns the checkpoint that was stored *before* the last
      write of that key (a lagging replica), when there was one;
    * ``lost_replies``: the write lands, then the call raises :class:`StorageFault` (a
      connection dropped after the commit): the caller cannot tell it from a failed write.

    ``fault_keys`` (a predicate on the storage key, or a collection of storage keys)
    limits every programmed and random fault to those keys; the counted budgets only
    count calls on those keys.

    Random faults (for soak tests): ``load_error_rate``, ``save_error_rate``,
    ``torn_rate``, ``stale_rate`` and ``lost_reply_rate`` are probabilities per call (per item of a batch),
    drawn from ``rng`` (seed it for reproducible runs).

    ``load_delay`` / ``save_delay`` are seconds to sleep before the call (virtual time
    works), or a callable returning them (e.g. random latency).

    Counters: ``loads``, ``saves``, ``deletes`` count calls that reached the inner backend
    (items of a batched write count one each), ``save_batches`` the batches;
    ``faults`` counts injected faults by kind (``"load"``, ``"save"``, ``"delete"``,
    ``"torn"``, ``"stale"``, ``"lost_reply"``) and ``faulted_keys[kind]`` is the set of storage keys that
    got one; ``in_flight`` is the number of calls under way.
    """

    def __init__(self, inner: Any = None, *, seed: int | None = None) -> None:
        self.inner: Any = MemoryStorage() if inner is None else inner
        self.fail_load: Setting = False
        self.fail_save: Setting = False
        self.fail_delete: Setting = False
        self.torn_saves: bool | int = False
        self.stale_loads: bool | int = False
        self.lost_replies: bool | int = False
        self.fault_keys: Callable[[str], bool] | Any = None
        self.load_error_rate = 0.0
        self.save_error_rate = 0.0
        self.torn_rate = 0.0
        self.stale_rate = 0.0
        self.lost_reply_rate = 0.0
        self.rng = random.Random(seed)
        self.load_delay: float | Callable[[], float] = 0.0
        self.save_delay: float | Callable[[], float] = 0.0
        self.loads = 0
        self.saves = 0
        self.deletes = 0
        self.save_batches = 0
        self.in_flight = 0
        self.faults: Counter[str] = Counter()
        self.faulted_keys: dict[str, set[str]] = {}
        self._previous: dict[str, Checkpoint] = {}
        self._settled: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        return f"<FaultyStorage {self.inner!r} loads={self.loads} saves={self.saves}>"

    # -- programming ----------------------------------------------------------------------

    def heal(self) -> None:
        """Switch every programmed and random fault off (delays and counters stay)."""
        self.fail_load = self.fail_save = self.fail_delete = False
        self.torn_saves = self.stale_loads = self.lost_replies = False
        self.load_error_rate = self.save_error_rate = self.torn_rate = self.stale_rate = 0.0
        self.lost_reply_rate = 0.0
        self.fault_keys = None

    @property
    def total_faults(self) -> int:
        """How many faults were injected so far, of every kind."""
        return sum(self.faults.values())

    async def settled(self) -> None:
        """Wait until no call is under way (delays included)."""
        if self.in_flight:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settled.append(fut)
            await fut

    def _begin(self) -> None:
        self.in_flight += 1

    def _end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            waiters, self._settled = self._settled, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _targets(self, key: str) -> bool:
        keys = self.fault_keys
        if keys is None:
            return True
        if callable(keys):
            return bool(keys(key))
        return key in keys

    def _take(self, name: str, key: str) -> bool | BaseException:
        """Whether the programmed fault ``name`` fires for ``key`` (consuming a budget)."""
        setting = getattr(self, name)
        if setting is False or setting is None or (type(setting) is int and setting <= 0):
            return False
        if not self._targets(key):
            return False
        if isinstance(setting, BaseException):
            return setting
        if setting is not True:
            setattr(self, name, setting - 1)
        return True

    def _count(self, kind: str, key: str) -> None:
        self.faults[kind] += 1
        self.faulted_keys.setdefault(kind, set()).add(key)

    def _roll(self, rate: float, key: str) -> bool:
        return rate > 0 and self._targets(key) and self.rng.random() < rate

    def _raise_if(self, name: str, rate: float, key: str) -> None:
        fired = self._take(name, key)
        kind = name.removeprefix("fail_")
        if fired is False and self._roll(rate, key):
            fired = True
        if fired is False:
            return
        self._count(kind, key)
        if isinstance(fired, BaseException):
            raise fired
        raise StorageFault(f"injected {kind} failure")

    @staticmethod
    async def _sleep(delay: float | Callable[[], float]) -> None:
        seconds = delay() if callable(delay) else delay
        if seconds:
            await asyncio.sleep(seconds)

    # -- the Storage protocol ------------------------------------------------------------------

    async def load(self, key: str) -> Checkpoint | None:
        self._begin()
        try:
            await self._sleep(self.load_delay)
            self._raise_if("fail_load", self.load_error_rate, key)
            self.loads += 1
            result: Checkpoint | None = await self.inner.load(key)
            if result is not None and key in self._previous and (
                self._take("stale_loads", key) or self._roll(self.stale_rate, key)
            ):
                self._count("stale", key)
                return self._previous[key]
            return result
        finally:
            self._end()

    def _torn(self, key: str, data: bytes) -> bytes:
        if self._take("torn_saves", key) or self._roll(self.torn_rate, key):
            self._count("torn", key)
            return data[: self.rng.randrange(len(data))] if data else data
        return data

    async def _save_one(self, key: str, data: bytes, expected_version: int | None) -> int:
        before: Checkpoint | None = None
        if expected_version is not None:
            before = await self.inner.load(key)
        version: int = await self.inner.save(key, self._torn(key, data), expected_version=expected_version)
        if before is not None:
            self._previous[key] = before
        return version

    def _lose_reply(self, key: str) -> None:
        if self._take("lost_replies", key) or self._roll(self.lost_reply_rate, key):
            self._count("lost_reply", key)
            raise StorageFault("injected lost reply: the write landed, the answer did not")

    async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
        self._begin()
        try:
            await self._sleep(self.save_delay)
            self._raise_if("fail_save", self.save_error_rate, key)
            self.saves += 1
            version = await self._save_one(key, data, expected_version)
            self._lose_reply(key)
            return version
        finally:
            self._end()

    async def save_many(self, items: Sequence[SaveItem]) -> list[int | BaseException]:
        """Batched writes; faults apply per item (a failed item does not write)."""
        self._begin()
        try:
            await self._sleep(self.save_delay)
            self.save_batches += 1
            out: list[int | BaseException] = []
            for item in items:
                try:
                    self._raise_if("fail_save", self.save_error_rate, item.key)
                    self.saves += 1
                    version = await self._save_one(item.key, item.data, item.expected_version)
                    self._lose_reply(item.key)
                    out.append(version)
                except Exception as exc:  # noqa: BLE001  # an injected fault of any kind is that item's result
                    out.append(exc)
            return out
        finally:
            self._end()

    async def delete(self, key: str) -> bool:
        self._raise_if("fail_delete", 0.0, key)
        self.deletes += 1
        self._previous.pop(key, None)
        removed: bool = await self.inner.delete(key)
        return removed

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[StoredKey]:
        async for item in self.inner.iter_keys(prefix):
            yield item

    async def aclose(self) -> None:
        await self.inner.aclose()


class EventRecorder:
    """Records a manager's lifecycle events and lets a test await the next matching one.

    ``await recorder.wait_for("hibernated", "user-1")`` returns the first matching event
    recorded since the recorder was made (or since the last ``clear()``), waiting if
    none has happened yet. ``await recorder.wait_next(...)`` ignores what was already
    recorded. Use it as a context manager (``with EventRecorder(m) as events``) to
    unsubscribe at the end.
    """

    def __init__(self, manager: InstanceManager) -> None:
        self.events: list[Event] = []
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        self.unsubscribe = manager.subscribe(self._record)

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unsubscribe()

    def _record(self, event: Event) -> None:
        self.events.append(event)
        for entry in list(self._waiters):
            match, fut = entry
            if not fut.done() and match(event):
                fut.set_result(event)
                self._waiters.remove(entry)

    @staticmethod
    def _matcher(kind: str | EventKind, key: Any, partition: Any) -> Callable[[Event], bool]:
        kind = EventKind(kind)
        missing = _MISSING

        def match(event: Event) -> bool:
            return event.kind is kind and (key is missing or event.key == key) and (
                partition is missing or event.partition == partition
            )

        return match

    def _match(self, kind: str | EventKind, key: Any, partition: Any) -> Callable[[Event], bool]:
        return self._matcher(kind, _MISSING if key is None else key,
                             _MISSING if partition is None else partition)

    def kinds(self, key: Any = None) -> list[str]:
        """The kinds recorded so far (for one key when given), in order."""
        return [str(e.kind) for e in self.events if key is None or e.key == key]

    def of(self, kind: str | EventKind, key: Any = None, *, partition: Any = None) -> list[Event]:
        """The recorded events of ``kind`` (for ``key``/``partition`` when given), in order."""
        match = self._match(kind, key, partition)
        return [e for e in self.events if match(e)]

    def count(self, kind: str | EventKind, key: Any = None, *, partition: Any = None) -> int:
        """How many events of ``kind`` were recorded (for ``key``/``partition`` when given)."""
        return len(self.of(kind, key, partition=partition))

    def clear(self) -> None:
        """Forget the events recorded so far."""
        self.events.clear()

    async def _wait(self, match: Callable[[Event], bool], timeout: float | None) -> Event:
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        entry = (match, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def wait_for(self, kind: str | EventKind, key: Any = None, *,
                       partition: Any = None, timeout: float | None = None) -> Event:
        """The first recorded event of ``kind`` (for ``key``/``partition`` when given).

        Raises:
            TimeoutError: none within ``timeout`` seconds (loop time).
        """
        match = self._match(kind, key, partition)
        for event in self.events:
            if match(event):
                return event
        return await self._wait(match, timeout)

    async def wait_next(self, kind: str | EventKind, key: Any = None, *,
                        partition: Any = None, timeout: float | None = None) -> Event:
        """The next event of ``kind`` from now on, ignoring the ones already recorded.

        Raises:
            TimeoutError: none within ``timeout`` seconds (loop time).
        """
        return await self._wait(self._match(kind, key, partition), timeout)

    async def wait_count(self, kind: str | EventKind, n: int, key: Any = None, *,
                         partition: Any = None, timeout: float | None = None) -> list[Event]:
        """Wait until ``n`` events of ``kind`` were recorded; return them.

        Raises:
            TimeoutError: fewer within ``timeout`` seconds (loop time).
        """
        match = self._match(kind, key, partition)
        async with asyncio.timeout(timeout):
            while True:
                found = [e for e in self.events if match(e)]
                if len(found) >= n:
                    return found[:n]
                await self._wait(match, None)


_MISSING: Any = object()

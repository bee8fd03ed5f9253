"""What you need to test your own agents: fault-injecting storage and event waiters.

Example, on virtual time with the ``looptime`` pytest plugin::

    @pytest.mark.looptime
    async def test_my_agent_hibernates():
        storage = FaultyStorage()
        async with InstanceManager("t", MyAgent, idle_timeout=300, storage=storage) as m:
            events = EventRecorder(m)
            await m.call("k", "hello")
            await events.wait_for("hibernated", "k")   # 300 virtual seconds, no waiting
            assert storage.saves == 1
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ._events import Event, EventKind
from ._manager import InstanceManager
from .storage import Checkpoint, MemoryStorage, SaveItem, StoredKey

__all__ = ["EventRecorder", "FaultyStorage", "StorageFault"]


class StorageFault(ConnectionError):
    """The error :class:`FaultyStorage` raises when told to fail."""


class FaultyStorage:
    """A storage backend that fails, delays or counts on demand (wraps a real one).

    Set ``fail_load`` / ``fail_save`` / ``fail_delete`` to ``True`` (every call fails), an
    int (the next N calls fail) or an exception instance to raise. ``load_delay`` /
    ``save_delay`` are seconds to sleep before the call (virtual time works).
    ``loads``, ``saves``, ``deletes`` count calls that reached the inner backend;
    items of a batched write count one each.
    """

    def __init__(self, inner: Any = None) -> None:
        self.inner: Any = MemoryStorage() if inner is None else inner
        self.fail_load: bool | int | BaseException = False
        self.fail_save: bool | int | BaseException = False
        self.fail_delete: bool | int | BaseException = False
        self.load_delay = 0.0
        self.save_delay = 0.0
        self.loads = 0
        self.saves = 0
        self.deletes = 0
        self.save_batches = 0

    def __repr__(self) -> str:
        return f"<FaultyStorage {self.inner!r} loads={self.loads} saves={self.saves}>"

    def _fault(self, name: str) -> None:
        setting = getattr(self, name)
        if setting is False or setting == 0:
            return
        if isinstance(setting, BaseException):
            raise setting
        if setting is not True:
            setattr(self, name, setting - 1)
        raise StorageFault(f"injected {name.removeprefix('fail_')} failure")

    async def load(self, key: str) -> Checkpoint | None:
        if self.load_delay:
            await asyncio.sleep(self.load_delay)
        self._fault("fail_load")
        self.loads += 1
        result: Checkpoint | None = await self.inner.load(key)
        return result

    async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
        if self.save_delay:
            await asyncio.sleep(self.save_delay)
        self._fault("fail_save")
        self.saves += 1
        version: int = await self.inner.save(key, data, expected_version=expected_version)
        return version

    async def save_many(self, items: Sequence[SaveItem]) -> list[int | BaseException]:
        if self.save_delay:
            await asyncio.sleep(self.save_delay)
        self._fault("fail_save")
        self.saves += len(items)
        self.save_batches += 1
        inner_many = getattr(self.inner, "save_many", None)
        if inner_many is not None:
            results: list[int | BaseException] = await inner_many(items)
            return results
        out: list[int | BaseException] = []
        for item in items:
            try:
                out.append(await self.inner.save(item.key, item.data,
                                                 expected_version=item.expected_version))
            except Exception as exc:
                out.append(exc)
        return out

    async def delete(self, key: str) -> bool:
        self._fault("fail_delete")
        self.deletes += 1
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
    none has happened yet.
    """

    def __init__(self, manager: InstanceManager) -> None:
        self.events: list[Event] = []
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        self.unsubscribe = manager.subscribe(self._record)

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

    def kinds(self, key: Any = None) -> list[str]:
        """The kinds recorded so far (for one key when given), in order."""
        return [str(e.kind) for e in self.events if key is None or e.key == key]

    def clear(self) -> None:
        """Forget the events recorded so far."""
        self.events.clear()

    async def wait_for(self, kind: str | EventKind, key: Any = None, *,
                       partition: Any = None, timeout: float | None = None) -> Event:
        """The first recorded event of ``kind`` (for ``key``/``partition`` when given)."""
        match = self._matcher(kind, _MISSING if key is None else key,
                              _MISSING if partition is None else partition)
        for event in self.events:
            if match(event):
                return event
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        entry = (match, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)


_MISSING: Any = object()

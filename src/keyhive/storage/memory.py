"""MemoryStorage: the process-wide default and the reference backend."""

from __future__ import annotations

import heapq
import time
from collections.abc import AsyncIterator, Sequence

from .._errors import ConflictError, StorageError
from ._base import Checkpoint, Fence, SaveItem, StoredKey
from ._driver import check_due, check_dues, check_limit

__all__ = ["MemoryStorage"]


def _no_fence(fence: Fence | None) -> None:
    if fence is not None:
        raise ValueError(
            "MemoryStorage lives in one process and keeps no leases: call it without fence=, "
            "or use a shared backend (SQLite, Redis, PostgreSQL, File) for fenced writes"
        )


class MemoryStorage:
    """Checkpoints in a dict: survives manager restarts within one process, not the process.

    It is the reference for every other backend: the shared contract suite pins its
    behaviour. Bytes are stored as given (``bytes`` are immutable, so nothing is copied).
    The due-time index is a dict plus a heap of ``(due, key)`` with lazy deletion: a heap
    entry whose due time is no longer the key's is skipped when met and dropped when it
    reaches the top, and the heap is rebuilt once stale entries outnumber live ones.
    It keeps no leases (SPEC §10: one process needs none).
    """

    __slots__ = ("_closed", "_data", "_due", "_heap")

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int, float]] = {}
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemoryStorage keys={len(self._data)}>"

    def _check(self, key: str) -> None:
        if self._closed:
            raise StorageError("MemoryStorage is closed")
        if type(key) is not str:
            raise TypeError(f"storage keys are str, not {type(key).__name__}")

    async def load(self, key: str) -> Checkpoint | None:
        self._check(key)
        entry = self._data.get(key)
        return None if entry is None else Checkpoint(entry[0], entry[1])

    async def save(self, key: str, data: bytes, *, expected_version: int | None,
                   fence: Fence | None = None, due: float | None = None) -> int:
        """Compare-and-set ``data`` under ``key`` and set (or clear, ``due=None``) its due time."""
        self._check(key)
        _no_fence(fence)
        return self._save(key, data, expected_version, check_due(due))

    def _save(self, key: str, data: bytes, expected_version: int | None, due: float | None) -> int:
        if not isinstance(data, bytes):
            raise TypeError(f"checkpoint data must be bytes, not {type(data).__name__}")
        entry = self._data.get(key)
        current = None if entry is None else entry[1]
        if current != expected_version:
            raise ConflictError(
                f"version conflict on {key!r}: expected {expected_version}, stored {current}"
            )
        version = 1 if current is None else current + 1
        self._data[key] = (data, version, time.time())
        self._set_due(key, due)
        return version

    def _set_due(self, key: str, due: float | None) -> None:
        if due is None:
            self._due.pop(key, None)  # its heap entries are now stale: skipped, dropped later
            return
        if self._due.get(key) == due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            # Rebuild when stale entries outnumber live ones, so the heap stays O(live keys).
            self._heap = [(d, k) for k, d in self._due.items()]
            heapq.heapify(self._heap)

    async def save_many(self, items: Sequence[SaveItem], *, fence: Fence | None = None,
                        due: Sequence[float | None] | None = None) -> list[int | BaseException]:
        """Each item's compare-and-set in order, with ``due[i]`` set for item ``i``."""
        if self._closed:
            raise StorageError("MemoryStorage is closed")
        _no_fence(fence)
        dues = check_dues(due, len(items))
        results: list[int | BaseException] = []
        for item, item_due in zip(items, dues, strict=True):
            try:
                self._check(item.key)
                results.append(self._save(item.key, item.data, item.expected_version, item_due))
            except (ConflictError, TypeError) as exc:
                results.append(exc)
        return results

    async def delete(self, key: str, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` and its due time; ``True`` when something was removed."""
        self._check(key)
        _no_fence(fence)
        self._due.pop(key, None)
        return self._data.pop(key, None) is not None

    async def delete_if(self, key: str, version: int, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` only while its stored version is ``version``; ``True`` when removed."""
        self._check(key)
        _no_fence(fence)
        entry = self._data.get(key)
        if entry is None or entry[1] != version:
            return False
        del self._data[key]
        self._due.pop(key, None)
        return True

    async def due_keys(self, prefix: str, until: float, limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, due)`` with ``prefix`` and ``due <= until``, earliest first."""
        if self._closed:
            raise StorageError("MemoryStorage is closed")
        limit = check_limit(limit)
        until = float(until)
        heap, live = self._heap, self._due
        while heap and live.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # lazy deletion: drop stale entries that reach the top
        out: list[tuple[str, float]] = []
        # Walk the heap in order without popping it: a frontier of heap positions.
        frontier: list[tuple[float, str, int]] = [(heap[0][0], heap[0][1], 0)] if heap else []
        seen: set[str] = set()
        while frontier and len(out) < limit:
            due, key, pos = heapq.heappop(frontier)
            if due > until:
                break
            if live.get(key) == due and key not in seen and key.startswith(prefix):
                seen.add(key)
                out.append((key, due))
            for child in (2 * pos + 1, 2 * pos + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child][0], heap[child][1], child))
        return out

    async def stale_keys(self, prefix: str, older_than: float, limit: int = 1000) -> list[StoredKey]:
        """Up to ``limit`` checkpoints with ``prefix`` last written before ``older_than``, oldest first.

        A scan of the dict: this backend is one process's memory, where that is cheap enough.
        """
        if self._closed:
            raise StorageError("MemoryStorage is closed")
        limit = check_limit(limit)
        found = [StoredKey(key, version, len(data), updated)
                 for key, (data, version, updated) in self._data.items()
                 if updated < older_than and key.startswith(prefix)]
        return heapq.nsmallest(limit, found, key=lambda s: (s.updated_at or 0.0, s.key))

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[StoredKey]:
        """Every key under ``prefix``, in insertion order.

        It walks a snapshot of the matching key names (one pointer each: the data is in
        memory anyway) so that saves and deletes between two steps are safe; each entry is
        read when it is reached, and one deleted meanwhile is skipped.
        """
        data = self._data
        for key in [k for k in data if k.startswith(prefix)]:
            entry = data.get(key)
            if entry is not None:
                yield StoredKey(key, entry[1], len(entry[0]), entry[2])

    async def ping(self) -> None:
        """Nothing to reach: fails only once the storage is closed."""
        if self._closed:
            raise StorageError("MemoryStorage is closed")

    async def aclose(self) -> None:
        self._closed = True

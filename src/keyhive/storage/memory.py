"""MemoryStorage: the process-wide default and the reference backend."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from .._errors import ConflictError, StorageError
from ._base import Checkpoint, SaveItem, StoredKey

__all__ = ["MemoryStorage"]


class MemoryStorage:
    """Checkpoints in a dict: survives manager restarts within one process, not the process.

    It is the reference for every other backend: the shared contract suite pins its
    behaviour. Bytes are stored as given (``bytes`` are immutable, so nothing is copied).
    """

    __slots__ = ("_closed", "_data")

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int, float]] = {}
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

    async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
        self._check(key)
        return self._save(key, data, expected_version)

    def _save(self, key: str, data: bytes, expected_version: int | None) -> int:
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
        return version

    async def save_many(self, items: Sequence[SaveItem]) -> list[int | BaseException]:
        if self._closed:
            raise StorageError("MemoryStorage is closed")
        results: list[int | BaseException] = []
        for item in items:
            try:
                self._check(item.key)
                results.append(self._save(item.key, item.data, item.expected_version))
            except (ConflictError, TypeError) as exc:
                results.append(exc)
        return results

    async def delete(self, key: str) -> bool:
        self._check(key)
        return self._data.pop(key, None) is not None

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

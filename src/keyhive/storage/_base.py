"""The storage protocol every backend implements (no inheritance needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["Checkpoint", "SaveItem", "Storage", "StoredKey"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Stored bytes and the version a compare-and-set write must name to replace them."""

    data: bytes
    version: int


class SaveItem(NamedTuple):
    """One write of a batch: ``save(key, data, expected_version=...)``.

    A named tuple: a hibernate storm makes one per agent, and a tuple is the cheapest
    immutable record to build.
    """

    key: str
    data: bytes
    expected_version: int | None


@dataclass(frozen=True, slots=True)
class StoredKey:
    """What ``iter_keys`` reports about one stored checkpoint (for tools, not hot paths)."""

    key: str
    version: int
    size: int
    updated_at: float | None = None  # seconds since the epoch, when the backend knows


@runtime_checkable
class Storage(Protocol):
    """Opaque bytes under opaque string keys, with versions as compare-and-set.

    Backends may raise anything; the manager maps every exception except
    :class:`~keyhive.ConflictError` to :class:`~keyhive.StorageError`.
    Optional extras a backend may add, found by name: ``save_many(items)`` for batched
    writes and ``iter_keys(prefix)`` for tools.
    """

    async def load(self, key: str) -> Checkpoint | None:
        """The checkpoint stored under ``key``, or ``None``."""
        ...

    async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
        """Write ``data`` if the stored version is ``expected_version``; return the new version.

        ``expected_version=None`` means the key must not exist yet. A mismatch raises
        :class:`~keyhive.ConflictError` and writes nothing.
        """
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` when something was removed."""
        ...

    async def aclose(self) -> None:
        """Release connections, files and threads."""
        ...


class BatchStorage(Storage, Protocol):
    """A backend that writes many checkpoints in one round trip."""

    async def save_many(self, items: Sequence[SaveItem]) -> list[int | BaseException]:
        """Save each item with its own compare-and-set; one result per item, in order.

        A result is the new version, or the exception for that item (a
        :class:`~keyhive.ConflictError` for a version mismatch). An exception raised by
        the call itself means no item is known to be written.
        """
        ...


class ListableStorage(Storage, Protocol):
    """A backend that can stream its keys (used by the ``keyhive`` command)."""

    def iter_keys(self, prefix: str = "") -> AsyncIterator[StoredKey]:
        """Every stored key starting with ``prefix``, streamed, in no particular order."""
        ...

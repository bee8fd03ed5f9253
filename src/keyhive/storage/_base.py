"""The storage protocol every backend implements (no inheritance needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = [
    "BatchStorage",
    "Checkpoint",
    "Fence",
    "Lease",
    "LeaseStorage",
    "ListableStorage",
    "SaveItem",
    "Storage",
    "StoredKey",
    "TimerIndexStorage",
]


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


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a write is made under: it lands only while ``name`` still has ``epoch``.

    Passed as ``fence=`` to ``save``, ``save_many`` and ``delete`` of a
    :class:`LeaseStorage`. When the lease's epoch has moved on (another holder took it
    over), the call writes nothing and raises :class:`~keyhive.LeaseLost`.
    """

    name: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease as stored: who holds ``name``, under which epoch, and for how long.

    ``holder`` is the holder's own string (``"host:pid:instance"``). ``epoch`` grows by one
    every time the lease passes to another holder; renewing keeps it. ``acquired_at`` is
    when the current holder took it and ``expires_in`` how many seconds it had left when
    it was read, both by the storage's clock (the server's, where there is one).
    ``released`` is true once its holder gave it up.
    """

    name: str
    holder: str
    epoch: int
    acquired_at: float
    expires_in: float
    released: bool = False


@runtime_checkable
class LeaseStorage(Storage, Protocol):
    """A shared backend that keeps leases and fences writes with their epoch (SPEC §10).

    Lease records live in the storage itself, beside the checkpoints, and never show in
    ``iter_keys``. Each backend judges expiry by one clock for all its clients (the
    server's, or the one machine's for SQLite and files), so two holders never compare
    their own clocks.
    """

    async def acquire_lease(self, name: str, holder: str, ttl: float, *,
                            takeover: bool = False) -> Lease:
        """Take, or renew, the lease ``name`` for ``ttl`` seconds; return it as stored now.

        Free, released, expired or already ``holder``'s: it becomes ``holder``'s, with
        ``epoch + 1`` when it changes hands and the same epoch on renewal. A new record starts
        at an epoch no earlier record of that name can have had (1 on durable backends; a
        backend that may lose its data, such as Redis, starts from its clock).
        Held by another holder and not expired: nothing changes and that holder's lease
        is returned (the caller compares ``lease.holder``), unless ``takeover`` is set,
        which takes it anyway with ``epoch + 1`` (a restarted Ray shard host).
        """
        ...

    async def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        """Give the lease up at once, keeping its epoch; False when it is not ours anymore."""
        ...

    async def read_lease(self, name: str) -> Lease | None:
        """The lease ``name`` as stored, or ``None`` when nobody ever took it."""
        ...


@runtime_checkable
class TimerIndexStorage(Storage, Protocol):
    """A backend with an index of due times beside the checkpoints (SPEC §12).

    ``save(..., due=t)`` and ``save_many(items, due=[...])`` set, in the same atomic
    write as the checkpoint, the key's due time (seconds since the epoch; ``None``
    removes the key from the index); ``delete`` removes it too.
    """

    async def due_keys(self, prefix: str, until: float, limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, due)`` with ``prefix`` and ``due <= until``, earliest first."""
        ...

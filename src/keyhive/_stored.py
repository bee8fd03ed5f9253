"""Stored checkpoints seen from outside: list a manager's keys, check one exists.

Nothing here wakes an agent: both read storage directly. ``stored_keys`` streams from
the backend's ``iter_keys(prefix)`` (one page or one SCAN batch at a time), so a million
checkpoints never sit in memory. ``InstanceManager.stored_keys()`` / ``exists()`` and the
``keyhive`` command are built on these.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from ._errors import KeyhiveError, StorageError
from ._keys import check_key, decode_storage_key, storage_key, storage_prefix

__all__ = ["ALL", "StoredRecord", "exists", "records_under", "stored_keys"]


class _All(enum.Enum):
    ALL = "ALL"

    def __repr__(self) -> str:
        return "keyhive.ALL"


ALL: Final = _All.ALL
"""``partition=ALL`` (the default of :func:`stored_keys`): every partition, ``None`` included."""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One stored checkpoint of a manager: the user key and partition, as given to ``get``."""

    key: Any
    partition: Any
    version: int
    size: int
    updated_at: float | None  # seconds since the epoch, when the backend knows


def _listing(storage: Any) -> Any:
    iter_keys = getattr(storage, "iter_keys", None)
    if not callable(iter_keys):
        raise TypeError(
            f"{type(storage).__name__} cannot list its keys: give it an "
            "'iter_keys(prefix)' async iterator of keyhive.StoredKey (every shipped backend has one)"
        )
    return iter_keys


async def records_under(storage: Any, prefix: str) -> AsyncIterator[tuple[str, StoredRecord]]:
    """``(manager, record)`` for every keyhive checkpoint under ``prefix``, streamed."""
    iter_keys = _listing(storage)
    try:
        async for item in iter_keys(prefix):
            try:
                manager, partition, key = decode_storage_key(item.key)
            except ValueError:
                continue  # not a keyhive checkpoint (a foreign key in a shared store)
            yield manager, StoredRecord(key, partition, item.version, item.size, item.updated_at)
    except KeyhiveError:
        raise
    except Exception as exc:  # a user-written backend's own error: map it at the boundary
        raise StorageError(f"{storage!r}: listing keys failed: {exc!r}") from exc


async def stored_keys(storage: Any, manager: str, *,
                      partition: Any = ALL) -> AsyncIterator[StoredRecord]:
    """Every checkpoint ``manager`` has in ``storage`` (of one partition, when given), streamed.

    ``partition=None`` lists the default partition only; the default ``ALL`` lists every one.
    Records come in the backend's order (key order for SQL backends, none for Redis).

    Raises:
        TypeError: ``manager`` is not a str, the partition has a bad type, or ``storage``
            has no ``iter_keys``.
        StorageError: the backend failed; its exception is ``__cause__``.
    """
    if not isinstance(manager, str):
        raise TypeError(f"manager must be the manager's name (a str), not {type(manager).__name__}")
    if partition is ALL:
        prefix = storage_prefix(manager)
    else:
        if partition is not None:
            check_key(partition, "partition")
        prefix = storage_prefix(manager, partition)
    _listing(storage)  # fail now, not at the first iteration, when it cannot list
    async for name, record in records_under(storage, prefix):
        # The prefix is exact (it ends at a separator), but a foreign backend may over-match.
        if name == manager and (partition is ALL or record.partition == partition):
            yield record


def _defined_in(cls: type, name: str) -> type | None:
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


async def exists(storage: Any, manager: str, partition: Any, key: Any) -> bool:
    """Whether a checkpoint of ``key`` (in ``partition``) of ``manager`` is stored.

    Uses the backend's ``exists(storage_key)`` when it has one, else ``load``. A subclass
    that overrides ``load`` below the class defining ``exists`` is asked through ``load``,
    so an override is never bypassed.

    Raises:
        TypeError, ValueError: a bad key or partition (as ``get`` would raise).
        StorageError: the backend failed; its exception is ``__cause__``.
    """
    if not isinstance(manager, str):
        raise TypeError(f"manager must be the manager's name (a str), not {type(manager).__name__}")
    check_key(key)
    if partition is not None:
        check_key(partition, "partition")
    skey = storage_key(manager, partition, key)
    cls = type(storage)
    has = _defined_in(cls, "exists")
    loader = _defined_in(cls, "load")
    use_exists = callable(getattr(storage, "exists", None)) and (
        has is None or loader is None or issubclass(has, loader))
    try:
        if use_exists:
            return bool(await storage.exists(skey))
        return await storage.load(skey) is not None
    except KeyhiveError:
        raise
    except Exception as exc:
        raise StorageError(f"{storage!r}: cannot check {skey!r}: {exc!r}") from exc

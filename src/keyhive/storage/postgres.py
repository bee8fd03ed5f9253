"""PostgresStorage: checkpoints in one PostgreSQL table, on asyncpg (``keyhive[postgres]``).

``postgresql://user:password@host:5432/db?table=keyhive_checkpoints&pool_max=10``. The
table is created on first use. A save is one statement: ``INSERT … ON CONFLICT DO
NOTHING`` for a new key, ``UPDATE … WHERE version = $n`` otherwise, so compare-and-set
needs no lock and no read. ``save_many`` sends a whole batch as one statement over
``unnest`` arrays (one round trip) and reports each item's own result.

asyncpg was chosen over psycopg 3 for its binary protocol and prepared-statement cache,
which is what a batch of thousands of small writes spends its time on.

Durability is the server's: with PostgreSQL defaults (``synchronous_commit=on``, fsync)
an acknowledged checkpoint survives a crash of this process, of the server, and a power
loss.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from .._errors import ConflictError, StorageError
from ._base import Checkpoint, SaveItem, StoredKey
from ._driver import LoadBatcher, import_driver, split_options

__all__ = ["PostgresStorage"]

_asyncpg: Any = import_driver("asyncpg", "postgres")

_OWN_OPTIONS = {"table", "pool_min", "pool_max"}
_DRIVER_ERRORS = (_asyncpg.PostgresError, _asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


def _escape(key: str) -> str:
    """PostgreSQL text cannot hold NUL: map it (and the escape char) char by char.

    Char-wise, so the escaped prefix of a key is a prefix of the escaped key.
    """
    if "\x00" not in key and "\\" not in key:
        return key
    return key.replace("\\", "\\\\").replace("\x00", "\\0")


def _unescape(stored: str) -> str:
    if "\\" not in stored:
        return stored
    out: list[str] = []
    chars = iter(stored)
    for c in chars:
        out.append(("\x00" if next(chars) == "0" else "\\") if c == "\\" else c)
    return "".join(out)


class PostgresStorage:
    """Checkpoints in PostgreSQL. See the module docstring for the guarantees."""

    def __init__(self, dsn: str, *, table: str = "keyhive_checkpoints", pool_min: int = 1,
                 pool_max: int = 10) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, not {type(dsn).__name__}")
        if not table.replace(".", "_").isidentifier():
            raise ValueError(f"table must be a plain identifier, not {table!r}")
        if not (isinstance(pool_min, int) and isinstance(pool_max, int) and 0 <= pool_min <= pool_max
                and pool_max >= 1):
            raise ValueError(f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}, {pool_max}")
        self._dsn = dsn
        self.table = table
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._pool: Any = None
        self._opening: asyncio.Lock | None = None
        self._closed = False
        self._loads = LoadBatcher(self._read)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> PostgresStorage:
        """Build from a URL; ``table``, ``pool_min`` and ``pool_max`` come from the query."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"not a PostgreSQL URL: {url!r}")
        own, dsn = split_options(url, _OWN_OPTIONS)
        kwargs: dict[str, Any] = {}
        if "table" in own:
            kwargs["table"] = own["table"]
        for name in ("pool_min", "pool_max"):
            if name in own:
                try:
                    kwargs[name] = int(own[name])
                except ValueError:
                    raise ValueError(f"{name} must be an int in {url!r}") from None
        kwargs.update(overrides)
        return cls(dsn, **kwargs)

    def __repr__(self) -> str:
        parts = urlsplit(self._dsn)
        return f"<PostgresStorage {parts.hostname}:{parts.port or 5432}{parts.path} table={self.table}>"

    async def _get_pool(self) -> Any:
        if self._closed:
            raise StorageError(f"{self!r} is closed")
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                try:
                    pool = await _asyncpg.create_pool(self._dsn, min_size=self._pool_min,
                                                      max_size=self._pool_max)
                    async with pool.acquire() as conn:
                        await conn.execute(
                            f"CREATE TABLE IF NOT EXISTS {self.table} ("
                            "key text PRIMARY KEY, data bytea NOT NULL, version bigint NOT NULL, "
                            "updated_at timestamptz NOT NULL DEFAULT now())"
                        )
                except _DRIVER_ERRORS as exc:
                    raise StorageError(f"{self!r}: cannot connect or create the table: {exc!r}") from exc
                self._pool = pool
        return self._pool

    async def _fetch(self, method: str, query: str, *args: Any) -> Any:
        pool = await self._get_pool()
        try:
            return await getattr(pool, method)(query, *args)
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"{self!r}: {exc!r}") from exc

    async def load(self, key: str) -> Checkpoint | None:
        return await self._loads.load(key)

    async def _read(self, keys: list[str]) -> dict[str, Checkpoint]:
        """The checkpoints of ``keys`` that exist, in one query."""
        escaped = {_escape(k): k for k in keys}
        rows = await self._fetch(
            "fetch", f"SELECT key, data, version FROM {self.table} WHERE key = ANY($1::text[])",
            list(escaped))
        return {escaped[key]: Checkpoint(bytes(data), int(version)) for key, data, version in rows}

    async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
        results = await self.save_many([SaveItem(key, data, expected_version)])
        result = results[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def save_many(self, items: Sequence[SaveItem]) -> list[int | BaseException]:
        items = list(items)
        for item in items:
            if type(item.key) is not str:
                raise TypeError(f"storage keys are str, not {type(item.key).__name__}")
            if not isinstance(item.data, bytes):
                raise TypeError(f"checkpoint data must be bytes, not {type(item.data).__name__}")
        # Each statement needs distinct keys: later writes of a key go in a later round.
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            n = seen.get(item.key, 0)
            seen[item.key] = n + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append(i)
        results: list[int | BaseException] = [0] * len(items)
        pool = await self._get_pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                for indexes in rounds:
                    rows = await conn.fetch(
                        self._batch_sql(),
                        [_escape(items[i].key) for i in indexes], [items[i].data for i in indexes],
                        [items[i].expected_version for i in indexes],
                    )
                    won = {int(ord_) - 1: int(version) for ord_, version in rows}
                    for pos, i in enumerate(indexes):
                        if pos in won:
                            results[i] = won[pos]
                        else:
                            results[i] = ConflictError(
                                f"version conflict on {items[i].key!r}: expected {items[i].expected_version}"
                            )
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"{self!r}: {exc!r}") from exc
        return results

    def _batch_sql(self) -> str:
        t = self.table
        return f"""
            WITH items AS (
                SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[])
                    WITH ORDINALITY AS i(key, data, expected, ord)
            ), upd AS (
                UPDATE {t} SET data = items.data, version = {t}.version + 1, updated_at = now()
                FROM items
                WHERE items.expected IS NOT NULL AND {t}.key = items.key AND {t}.version = items.expected
                RETURNING items.ord, {t}.version
            ), ins AS (
                INSERT INTO {t} (key, data, version)
                SELECT key, data, 1 FROM items WHERE expected IS NULL
                ON CONFLICT (key) DO NOTHING
                RETURNING key, version
            )
            SELECT ord, version FROM upd
            UNION ALL
            SELECT items.ord, ins.version FROM ins JOIN items ON items.key = ins.key
        """

    async def delete(self, key: str) -> bool:
        status = await self._fetch("execute", f"DELETE FROM {self.table} WHERE key = $1", _escape(key))
        return bool(status == "DELETE 1")

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[StoredKey]:
        """Every key under ``prefix``, in key order, in pages of 1,000 (``key > last``).

        Pages, not a cursor: no connection or transaction is held while the caller works
        between two rows, and a caller that stops early leaves nothing open.
        """
        escaped = _escape(prefix)
        after: str | None = None
        while True:
            if after is None:
                rows = await self._fetch(
                    "fetch", f"SELECT key, version, length(data), extract(epoch FROM updated_at) "
                    f"FROM {self.table} WHERE starts_with(key, $1) ORDER BY key LIMIT 1000", escaped)
            else:
                rows = await self._fetch(
                    "fetch", f"SELECT key, version, length(data), extract(epoch FROM updated_at) "
                    f"FROM {self.table} WHERE starts_with(key, $1) AND key > $2 "
                    "ORDER BY key LIMIT 1000", escaped, after)
            for key, version, size, updated in rows:
                yield StoredKey(_unescape(key), int(version), int(size), float(updated))
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    async def ping(self, *, timeout: float = 10.0) -> None:
        """Connect (creating the table on first use, as any call does) and run ``SELECT 1``.

        Raises:
            StorageError: the server cannot be reached or refused us; the message names
                host, port and database, the driver's exception is ``__cause__``.
        """
        parts = urlsplit(self._dsn)
        where = f"{parts.hostname}:{parts.port or 5432}{parts.path}"
        try:
            async with asyncio.timeout(timeout):
                await self._fetch("fetchval", "SELECT 1")
        except (StorageError, TimeoutError) as exc:
            if self._closed:
                raise
            cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ else exc
            what = f"no answer within {timeout:g} s" if isinstance(cause, TimeoutError) else repr(cause)
            raise StorageError(
                f"cannot reach PostgreSQL at {where}: {what}; is the server running? "
                "check host/port/user/password/database in the storage URL"
            ) from cause

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            await self._pool.close()

"""PostgresStorage: checkpoints in one PostgreSQL table, on asyncpg (``keyhive[postgres]``).

``postgresql://user:password@host:5432/db?table=keyhive_checkpoints&pool_max=10``. The
table is created on first use, under a transaction-scoped advisory lock so that many
clients (and processes) starting at once on a fresh database do not race. Beside it:
``<table>_leases`` (leases, timed by the server's ``clock_timestamp()``), a ``due``
column with an index (the due-time index) and an index on ``updated_at`` (retention).
A save is one statement: ``INSERT … ON CONFLICT DO NOTHING`` for a new key,
``UPDATE … WHERE version = $n`` otherwise, so compare-and-set needs no lock and no read.
``save_many`` sends a whole batch as one statement over
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
from ._base import Checkpoint, Fence, Lease, SaveItem, StoredKey
from ._driver import (
    LoadBatcher,
    check_dues,
    check_fence,
    check_lease_args,
    check_limit,
    import_driver,
    lease_lost,
    make_lease,
    split_options,
)

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
                pool = None
                try:
                    pool = await _asyncpg.create_pool(self._dsn, min_size=self._pool_min,
                                                      max_size=self._pool_max)
                    async with pool.acquire() as conn:
                        await self._create_schema(conn)
                except _DRIVER_ERRORS as exc:
                    if pool is not None:  # a pool whose start failed must not keep its connections
                        pool.terminate()
                    raise StorageError(f"{self!r}: cannot connect or create the table: {exc!r}") from exc
                except BaseException:
                    if pool is not None:
                        pool.terminate()
                    raise
                self._pool = pool
        return self._pool

    def _index_name(self, suffix: str) -> str:
        return f"{self.table.rpartition('.')[2]}_{suffix}"

    async def _create_schema(self, conn: Any) -> None:
        """Create the tables and indexes that are missing, one client at a time.

        ``CREATE TABLE IF NOT EXISTS`` is not safe under concurrency (two sessions can
        both try to create the table's type and one fails with a unique violation), so
        the whole schema is created under ``pg_advisory_xact_lock`` on the table's name,
        which serialises it across connections and processes.
        """
        t = self.table
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"keyhive-schema:{t}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {t} ("
                "key text PRIMARY KEY, data bytea NOT NULL, version bigint NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            )
            # Leases, the due-time index and retention: added to older tables too.
            await conn.execute(f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS due double precision")
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {self._index_name('due_idx')} ON {t} (due) "
                               "WHERE due IS NOT NULL")
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {self._index_name('updated_idx')} "
                               f"ON {t} (updated_at)")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {t}_leases ("
                "name text PRIMARY KEY, holder text NOT NULL, epoch bigint NOT NULL, "
                "acquired_at double precision NOT NULL, expires_at double precision NOT NULL, "
                "released boolean NOT NULL)"
            )

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

    async def save(self, key: str, data: bytes, *, expected_version: int | None,
                   fence: Fence | None = None, due: float | None = None) -> int:
        """Compare-and-set one checkpoint with its due time, under ``fence`` when given."""
        results = await self.save_many([SaveItem(key, data, expected_version)], fence=fence,
                                       due=None if due is None else [due])
        result = results[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def _check_fence(self, conn: Any, fence: Fence) -> None:
        """Raise LeaseLost unless the lease has ``fence``'s epoch; lock its row until commit.

        ``FOR SHARE`` makes a takeover (an UPDATE of the row) wait for this transaction,
        so the check and the writes after it are one atomic step.
        """
        row = await conn.fetchrow(f"SELECT epoch, released FROM {self.table}_leases WHERE name = $1 "
                                  "FOR SHARE", _escape(fence.name))
        if row is None or row[0] != fence.epoch or row[1]:
            raise lease_lost(fence, "no lease" if row is None else f"epoch {row[0]}"
                                                                   f"{', released' if row[1] else ''}")

    async def save_many(self, items: Sequence[SaveItem], *, fence: Fence | None = None,
                        due: Sequence[float | None] | None = None) -> list[int | BaseException]:
        """A whole batch in one transaction; with ``fence``, all of it or (LeaseLost) none."""
        items = list(items)
        fence = check_fence(fence)
        dues = check_dues(due, len(items))
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
                if fence is not None:
                    await self._check_fence(conn, fence)
                for indexes in rounds:
                    rows = await conn.fetch(
                        self._batch_sql(),
                        [_escape(items[i].key) for i in indexes], [items[i].data for i in indexes],
                        [items[i].expected_version for i in indexes], [dues[i] for i in indexes],
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
                SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[], $4::double precision[])
                    WITH ORDINALITY AS i(key, data, expected, due, ord)
            ), upd AS (
                UPDATE {t} SET data = items.data, version = {t}.version + 1, updated_at = now(),
                    due = items.due
                FROM items
                WHERE items.expected IS NOT NULL AND {t}.key = items.key AND {t}.version = items.expected
                RETURNING items.ord, {t}.version
            ), ins AS (
                INSERT INTO {t} (key, data, version, due)
                SELECT key, data, 1, due FROM items WHERE expected IS NULL
                ON CONFLICT (key) DO NOTHING
                RETURNING key, version
            )
            SELECT ord, version FROM upd
            UNION ALL
            SELECT items.ord, ins.version FROM ins JOIN items ON items.key = ins.key
        """

    async def _delete(self, key: str, version: int | None, fence: Fence | None) -> bool:
        fence = check_fence(fence)
        if type(key) is not str:
            raise TypeError(f"storage keys are str, not {type(key).__name__}")
        pool = await self._get_pool()
        query = f"DELETE FROM {self.table} WHERE key = $1"
        args: list[Any] = [_escape(key)]
        if version is not None:
            query += " AND version = $2"
            args.append(version)
        try:
            if fence is None:
                status = await pool.execute(query, *args)
            else:
                async with pool.acquire() as conn, conn.transaction():
                    await self._check_fence(conn, fence)
                    status = await conn.execute(query, *args)
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"{self!r}: {exc!r}") from exc
        return bool(status == "DELETE 1")

    async def delete(self, key: str, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` (and so its due time); ``True`` when something was removed."""
        return await self._delete(key, None, fence)

    async def delete_if(self, key: str, version: int, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` only while its stored version is ``version``; ``True`` when removed."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, not {type(version).__name__}")
        return await self._delete(key, version, fence)

    async def due_keys(self, prefix: str, until: float, limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, due)`` with ``prefix`` and ``due <= until``, earliest first."""
        limit = check_limit(limit)
        rows = await self._fetch(
            "fetch", f"SELECT key, due FROM {self.table} WHERE due IS NOT NULL AND due <= $1 "
            "AND starts_with(key, $2) ORDER BY due, key LIMIT $3", float(until), _escape(prefix), limit)
        return [(_unescape(key), float(due)) for key, due in rows]

    async def stale_keys(self, prefix: str, older_than: float, limit: int = 1000) -> list[StoredKey]:
        """Up to ``limit`` checkpoints with ``prefix`` last written before ``older_than``, oldest first."""
        limit = check_limit(limit)
        rows = await self._fetch(
            "fetch", f"SELECT key, version, length(data), extract(epoch FROM updated_at) FROM {self.table} "
            "WHERE updated_at < to_timestamp($1) AND starts_with(key, $2) ORDER BY updated_at, key LIMIT $3",
            float(older_than), _escape(prefix), limit)
        return [StoredKey(_unescape(k), int(v), int(n), float(u)) for k, v, n, u in rows]

    # -- leases -------------------------------------------------------------------------------------

    def _acquire_sql(self) -> str:
        # One statement: insert the lease, or take it when it is ours (renewal: same epoch),
        # released, expired or taken over (epoch + 1). EXCLUDED.acquired_at is "now".
        t = f"{self.table}_leases"
        return f"""
            INSERT INTO {t} AS l (name, holder, epoch, acquired_at, expires_at, released)
            SELECT $1, $2, 1, n.t, n.t + $3, false
                FROM (SELECT extract(epoch FROM clock_timestamp())::double precision AS t) AS n
            ON CONFLICT (name) DO UPDATE SET
                holder = EXCLUDED.holder,
                epoch = CASE WHEN l.holder = EXCLUDED.holder AND NOT l.released
                             THEN l.epoch ELSE l.epoch + 1 END,
                acquired_at = CASE WHEN l.holder = EXCLUDED.holder AND NOT l.released
                                   THEN l.acquired_at ELSE EXCLUDED.acquired_at END,
                expires_at = EXCLUDED.expires_at,
                released = false
            WHERE l.holder = EXCLUDED.holder OR l.released OR l.expires_at <= EXCLUDED.acquired_at OR $4
            RETURNING holder, epoch, acquired_at, expires_at, released,
                extract(epoch FROM clock_timestamp())::double precision
        """

    def _read_lease_sql(self) -> str:
        return (f"SELECT holder, epoch, acquired_at, expires_at, released, "
                f"extract(epoch FROM clock_timestamp())::double precision FROM {self.table}_leases "
                "WHERE name = $1")

    async def acquire_lease(self, name: str, holder: str, ttl: float, *,
                            takeover: bool = False) -> Lease:
        """Take or renew ``name`` for ``ttl`` seconds, by the server's clock; see LeaseStorage."""
        ttl = check_lease_args(name, holder, ttl)
        pool = await self._get_pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(self._acquire_sql(), _escape(name), _escape(holder), ttl,
                                          bool(takeover))
                if row is None:  # held by another, live: report it as stored
                    row = await conn.fetchrow(self._read_lease_sql(), _escape(name))
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"{self!r}: {exc!r}") from exc
        return self._lease(name, row)

    @staticmethod
    def _lease(name: str, row: Any) -> Lease:
        holder, epoch, since, expires, released, now = row
        return make_lease(name, _unescape(holder), epoch, since, expires, released, now)

    async def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        """Give ``name`` up at once, keeping its epoch; False when it is not ours anymore."""
        check_lease_args(name, holder)
        status = await self._fetch(
            "execute", f"UPDATE {self.table}_leases SET released = true, "
            "expires_at = extract(epoch FROM clock_timestamp()) "
            "WHERE name = $1 AND holder = $2 AND epoch = $3 AND NOT released",
            _escape(name), _escape(holder), int(epoch))
        return bool(status == "UPDATE 1")

    async def read_lease(self, name: str) -> Lease | None:
        """The lease ``name`` as stored, or None when nobody ever took it."""
        check_lease_args(name, "reader")
        row = await self._fetch("fetchrow", self._read_lease_sql(), _escape(name))
        return None if row is None else self._lease(name, row)

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

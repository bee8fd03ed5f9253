"""SQLiteStorage: the embedded durable default (``sqlite:///path.db``).

stdlib ``sqlite3`` on one dedicated worker thread, so no blocking call runs on the event
loop and the connection is only ever used from one thread. WAL journal; every write is
one compare-and-set statement (``INSERT … ON CONFLICT DO NOTHING`` for new keys,
``UPDATE … WHERE version = ?`` otherwise), never read-then-write. Concurrent loads are
coalesced into one ``SELECT … IN (…)`` per worker hop and ``save_many`` writes a whole
batch in one transaction, which is what makes idle storms and thaw storms fast. Several
processes may open the same file: SQLite's locking and ``busy_timeout`` keep them
correct.

Durability: with the default ``synchronous=normal`` a committed checkpoint survives a
crash of the process; after a power loss or OS crash the last transactions may be
missing, but the file is never corrupt. ``?synchronous=full`` survives power loss too
(one fsync per transaction).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

from .._errors import ConflictError, StorageError
from ._base import Checkpoint, Fence, Lease, SaveItem, StoredKey
from ._driver import (
    LoadBatcher,
    check_due,
    check_dues,
    check_fence,
    check_lease_args,
    check_limit,
    lease_lost,
    make_lease,
    query_options,
    url_flag,
)

__all__ = ["SQLiteStorage"]

T = TypeVar("T")

_SYNC = {"off": "OFF", "normal": "NORMAL", "full": "FULL", "extra": "EXTRA"}
_TABLE = "keyhive_checkpoints"
_MAX_PARAMS = 900  # below SQLite's default limit on bound parameters


def _after_prefix(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound).

    SQLite compares TEXT as UTF-8 bytes, which is code point order, so bumping the last
    code point that can be bumped gives the bound.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1 if not 0xD800 <= last + 1 <= 0xDFFF else 0xE000
            return "".join(chars) + chr(nxt)
    return None


_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
_ROWS_MAX = 1024  # rows per multi-row statement, at most


@functools.lru_cache(maxsize=64)
def _insert_sql(table: str, rows: int) -> str:
    return (f"INSERT INTO {table} (key, data, version, updated_at, due) VALUES "
            + ",".join(["(?, ?, 1, ?, ?)"] * rows) + " ON CONFLICT(key) DO NOTHING")


@functools.lru_cache(maxsize=64)
def _update_sql(table: str, rows: int) -> str:
    return (f"UPDATE {table} SET data = v.column2, version = {table}.version + 1, "
            "updated_at = v.column4, due = v.column5 FROM (VALUES "
            + ",".join(["(?, ?, ?, ?, ?)"] * rows)
            + f") AS v WHERE {table}.key = v.column1 AND {table}.version = v.column3")


def _batch_rows(items: list[SaveItem], dues: list[float | None],
                now: float) -> tuple[list[Any], list[Any]] | None:
    """The parameters of a batch's inserts and updates, for the statements of ``_write_rows``.

    None when the batch is not the usual one (distinct str keys, bytes data, int or None
    expected versions): a key twice must see its first write, and a bad item gets its own
    error, so such a batch is written item by item.
    """
    inserts: list[Any] = []
    updates: list[Any] = []
    keys = set()
    for item, due in zip(items, dues, strict=True):
        key, data, expected = item.key, item.data, item.expected_version
        if type(key) is not str or type(data) is not bytes or not (expected is None or type(expected) is int):
            return None
        keys.add(key)
        if expected is None:
            inserts += (key, data, now, due)
        else:
            updates += (key, data, expected, now, due)
    return None if len(keys) != len(items) else (inserts, updates)


def _write_rows(conn: sqlite3.Connection, table: str, rows: tuple[list[Any], list[Any]]) -> int:
    """Write a batch's rows in a few multi-row statements; how many rows they changed.

    Each statement is bound and stepped in C, so the worker takes the GIL a few times per
    batch, not once per row, and the event loop preparing the next batch is not held up
    (with one statement per row, the two threads wait on each other most of a storm).
    """
    inserts, updates = rows
    most = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 5)
    changed = _run_rows(conn, _insert_sql, table, inserts, 4, most)
    if _UPDATE_FROM:
        changed += _run_rows(conn, _update_sql, table, updates, 5, most)
    elif updates:  # SQLite before 3.33 has no UPDATE … FROM: one row at a time
        changed += conn.executemany(
            f"UPDATE {table} SET data = ?2, version = version + 1, updated_at = ?4, due = ?5 "
            "WHERE key = ?1 AND version = ?3", [updates[i:i + 5] for i in range(0, len(updates), 5)]).rowcount
    return changed


def _run_rows(conn: sqlite3.Connection, sql: Callable[[str, int], str], table: str,
              params: list[Any], width: int, most: int) -> int:
    """Run ``sql`` over ``params`` (``width`` per row) in power-of-two chunks of rows.

    Power-of-two sizes (up to ``_ROWS_MAX`` and the parameter limit) keep the statement
    texts few, so that SQLite's statement cache keeps every one of them prepared.
    """
    changed = 0
    start, rows = 0, len(params) // width
    size = _ROWS_MAX
    while rows:
        while size > rows or size > most:
            size //= 2
        end = start + size * width
        changed += conn.execute(sql(table, size), params[start:end]).rowcount
        start, rows = end, rows - size
    return changed


class SQLiteStorage:
    """Checkpoints in one SQLite table. See the module docstring for the guarantees."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "normal",
                 busy_timeout: float = 5.0, table: str = _TABLE, create: bool = True) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or path, not {type(path).__name__}")
        self.path = str(path)
        if not self.path:
            raise ValueError("SQLiteStorage needs a file path, e.g. SQLiteStorage('agents.db')")
        if synchronous.lower() not in _SYNC:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNC)}, not {synchronous!r}")
        self._synchronous = _SYNC[synchronous.lower()]
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float) or busy_timeout < 0:
            raise ValueError(f"busy_timeout must be seconds >= 0, not {busy_timeout!r}")
        self._busy_timeout = float(busy_timeout)
        if not table.isidentifier():
            raise ValueError(f"table must be a plain identifier, not {table!r}")
        self._table = table
        if not isinstance(create, bool):
            raise TypeError(f"create must be True or False, not {create!r}")
        # create=False: open an existing keyhive database only; never make a file or a table
        # (what read-only tools such as `keyhive ls` need).
        self.create = create
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._loads = LoadBatcher(self._read)

    @classmethod
    def from_url(cls, url: str) -> SQLiteStorage:
        """``sqlite:///relative.db``, ``sqlite:////absolute/path.db``, with options
        ``?synchronous=normal|full&busy_timeout=5&create=true|false``."""
        parts = urlsplit(url)
        if parts.netloc:
            raise ValueError(
                f"sqlite URLs have no host: write 'sqlite:///relative.db' or 'sqlite:////abs.db', not {url!r}"
            )
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ValueError(f"sqlite URL needs a file path, e.g. 'sqlite:///agents.db', not {url!r}")
        options = query_options(parts.query, {"synchronous", "busy_timeout", "create"}, url)
        kwargs: dict[str, Any] = {}
        if "create" in options:
            kwargs["create"] = url_flag(options["create"], "create", url)
        if "synchronous" in options:
            kwargs["synchronous"] = options["synchronous"]
        if "busy_timeout" in options:
            try:
                kwargs["busy_timeout"] = float(options["busy_timeout"])
            except ValueError:
                raise ValueError(f"busy_timeout must be seconds in {url!r}") from None
        return cls(path, **kwargs)

    def __repr__(self) -> str:
        return f"<SQLiteStorage {self.path!r}>"

    # -- the worker thread --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is not None:
            return conn
        if self.path != ":memory:":
            parent = Path(self.path).expanduser().resolve().parent
            if not parent.is_dir():
                raise FileNotFoundError(f"directory {str(parent)!r} does not exist")
            if not self.create and not Path(self.path).expanduser().is_file():
                raise FileNotFoundError(f"no SQLite database file {self.path!r} (nothing was created)")
        if self.create:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        else:  # mode=rw: SQLite itself refuses to create the file, even in a race
            uri = "file:" + quote(str(Path(self.path).expanduser())) + "?mode=rw"
            conn = sqlite3.connect(uri, timeout=self._busy_timeout, isolation_level=None,
                                   check_same_thread=False, uri=True)
        try:
            # The busy timeout goes first, before any statement touches the file.
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
            if self.create:
                self._switch_to_wal(conn)
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            if self.create:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._table} ("
                    "key TEXT PRIMARY KEY, data BLOB NOT NULL, version INTEGER NOT NULL, "
                    "updated_at REAL NOT NULL) WITHOUT ROWID"
                )
                self._create_index_tables(conn)
            elif conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (self._table,)).fetchone() is None:
                raise sqlite3.OperationalError(
                    f"{self.path!r} is a SQLite database without a {self._table} table "
                    "(not a keyhive database, or nothing was ever saved to it)")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        """``PRAGMA journal_mode=WAL``, retried while another process holds the file.

        Switching the journal needs an exclusive lock and SQLite does not call the busy
        handler for it, so two processes opening a new file at once could fail with
        ``database is locked``: retry until ``busy_timeout`` has passed.
        """
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- leases, the due-time index and retention (schema) --------------------------------------

    def _create_index_tables(self, conn: sqlite3.Connection) -> None:
        """The lease table, the ``due`` column and the indexes on ``due`` and ``updated_at``.

        In one ``BEGIN IMMEDIATE`` transaction, so two processes opening an older file at
        once never both add the column.
        """
        table = self._table
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if "due" not in columns:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN due REAL")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_due ON {table} (due) WHERE due IS NOT NULL")
            conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_updated_at ON {table} (updated_at)")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table}_leases ("
                "name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch INTEGER NOT NULL, "
                "acquired_at REAL NOT NULL, expires_at REAL NOT NULL, released INTEGER NOT NULL)"
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StorageError(f"{self!r} is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="keyhive-sqlite")

        def job() -> T:
            return fn(self._connect())

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, job)
        except (ConflictError, StorageError, TypeError):
            raise
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"{self!r}: {exc}") from exc

    # -- the protocol -----------------------------------------------------------------------------

    async def load(self, key: str) -> Checkpoint | None:
        return await self._loads.load(key)

    async def _read(self, keys: list[str]) -> dict[str, Checkpoint]:
        """The checkpoints of ``keys`` that exist, in one worker hop."""
        table = self._table

        def read(conn: sqlite3.Connection) -> dict[str, Checkpoint]:
            found: dict[str, Checkpoint] = {}
            for start in range(0, len(keys), _MAX_PARAMS):
                chunk = keys[start:start + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                for key, data, version in conn.execute(
                    f"SELECT key, data, version FROM {table} WHERE key IN ({marks})", chunk
                ):
                    found[key] = Checkpoint(bytes(data), version)
            return found

        return await self._run(read)

    @staticmethod
    def _save_one(conn: sqlite3.Connection, table: str, key: str, data: bytes,
                  expected: int | None, now: float, due: float | None = None) -> int:
        if type(key) is not str:
            raise TypeError(f"storage keys are str, not {type(key).__name__}")
        if not isinstance(data, bytes):
            raise TypeError(f"checkpoint data must be bytes, not {type(data).__name__}")
        if expected is None:
            cur = conn.execute(
                f"INSERT INTO {table} (key, data, version, updated_at, due) VALUES (?, ?, 1, ?, ?) "
                "ON CONFLICT(key) DO NOTHING", (key, data, now, due))
            new = 1
        else:
            cur = conn.execute(
                f"UPDATE {table} SET data = ?, version = version + 1, updated_at = ?, due = ? "
                "WHERE key = ? AND version = ?", (data, now, due, key, expected))
            new = expected + 1
        if cur.rowcount == 1:
            return new
        row = conn.execute(f"SELECT version FROM {table} WHERE key = ?", (key,)).fetchone()
        raise ConflictError(
            f"version conflict on {key!r}: expected {expected}, stored {None if row is None else row[0]}"
        )

    def _check_fence(self, conn: sqlite3.Connection, fence: Fence) -> None:
        """Raise LeaseLost unless ``fence`` names the stored epoch (inside the write's transaction)."""
        row = conn.execute(f"SELECT epoch, released FROM {self._table}_leases WHERE name = ?",
                           (fence.name,)).fetchone()
        if row is None or row[0] != fence.epoch or row[1]:
            stored = "no lease" if row is None else f"epoch {row[0]}{', released' if row[1] else ''}"
            raise lease_lost(fence, stored)

    def _fenced(self, conn: sqlite3.Connection, fence: Fence, write: Callable[[], T]) -> T:
        """``write()`` in one ``BEGIN IMMEDIATE`` transaction after the fence check."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_fence(conn, fence)
            result = write()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def save(self, key: str, data: bytes, *, expected_version: int | None,
                   fence: Fence | None = None, due: float | None = None) -> int:
        """Compare-and-set one checkpoint, with its due time, under ``fence`` when given."""
        table = self._table
        fence = check_fence(fence)
        due = check_due(due)

        def write(conn: sqlite3.Connection) -> int:
            now = time.time()
            if fence is None:  # one autocommit statement, as fast as before leases existed
                return self._save_one(conn, table, key, data, expected_version, now, due)
            return self._fenced(
                conn, fence, lambda: self._save_one(conn, table, key, data, expected_version, now, due))

        return await self._run(write)

    async def save_many(self, items: Sequence[SaveItem], *, fence: Fence | None = None,
                        due: Sequence[float | None] | None = None) -> list[int | BaseException]:
        """A whole batch in one transaction; with ``fence``, all of it or (LeaseLost) none."""
        table = self._table
        items = list(items)
        fence = check_fence(fence)
        dues = check_dues(due, len(items))

        def write(conn: sqlite3.Connection) -> list[int | BaseException]:
            now = time.time()
            rows = _batch_rows(items, dues, now)
            conn.execute("BEGIN IMMEDIATE")
            try:
                if fence is not None:
                    self._check_fence(conn, fence)
                if rows is not None:
                    if _write_rows(conn, table, rows) == len(items):
                        conn.execute("COMMIT")
                        return [1 if it.expected_version is None else it.expected_version + 1
                                for it in items]
                    # a conflict: undo all of it, and write item by item to find which
                    conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                    if fence is not None:
                        self._check_fence(conn, fence)
                results: list[int | BaseException] = []
                for item, item_due in zip(items, dues, strict=True):
                    try:
                        results.append(self._save_one(conn, table, item.key, item.data,
                                                      item.expected_version, now, item_due))
                    except (ConflictError, TypeError) as exc:
                        results.append(exc)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return results

        return await self._run(write)

    async def delete(self, key: str, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` (and its due time); ``True`` when something was removed."""
        table = self._table
        fence = check_fence(fence)

        def remove(conn: sqlite3.Connection) -> bool:
            def run() -> bool:
                return bool(conn.execute(f"DELETE FROM {table} WHERE key = ?", (key,)).rowcount == 1)

            return run() if fence is None else self._fenced(conn, fence, run)

        return await self._run(remove)

    async def delete_if(self, key: str, version: int, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` only while its stored version is ``version``; ``True`` when removed."""
        table = self._table
        fence = check_fence(fence)

        def remove(conn: sqlite3.Connection) -> bool:
            def run() -> bool:
                return bool(conn.execute(f"DELETE FROM {table} WHERE key = ? AND version = ?",
                                         (key, version)).rowcount == 1)

            return run() if fence is None else self._fenced(conn, fence, run)

        return await self._run(remove)

    async def due_keys(self, prefix: str, until: float, limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, due)`` with ``prefix`` and ``due <= until``, earliest first."""
        table = self._table
        limit = check_limit(limit)
        until = float(until)

        def read(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            rows = conn.execute(
                f"SELECT key, due FROM {table} INDEXED BY {table}_due "
                "WHERE due IS NOT NULL AND due <= ? AND substr(key, 1, ?) = ? ORDER BY due, key LIMIT ?",
                (until, len(prefix), prefix, limit)).fetchall()
            return [(key, float(due)) for key, due in rows]

        return await self._run(read)

    async def stale_keys(self, prefix: str, older_than: float, limit: int = 1000) -> list[StoredKey]:
        """Up to ``limit`` checkpoints with ``prefix`` last written before ``older_than``, oldest first."""
        table = self._table
        limit = check_limit(limit)

        def read(conn: sqlite3.Connection) -> list[StoredKey]:
            rows = conn.execute(
                f"SELECT key, version, length(data), updated_at FROM {table} INDEXED BY {table}_updated_at "
                "WHERE updated_at < ? AND substr(key, 1, ?) = ? ORDER BY updated_at, key LIMIT ?",
                (float(older_than), len(prefix), prefix, limit)).fetchall()
            return [StoredKey(key, version, size, updated) for key, version, size, updated in rows]

        return await self._run(read)

    # -- leases -------------------------------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float, *,
                            takeover: bool = False) -> Lease:
        """Take or renew ``name`` for ``ttl`` seconds (this machine's clock); see LeaseStorage."""
        ttl = check_lease_args(name, holder, ttl)
        leases = f"{self._table}_leases"

        def acquire(conn: sqlite3.Connection) -> Lease:
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                row = conn.execute(f"SELECT holder, epoch, acquired_at, expires_at, released FROM {leases} "
                                   "WHERE name = ?", (name,)).fetchone()
                if row is None:
                    conn.execute(f"INSERT INTO {leases} VALUES (?, ?, 1, ?, ?, 0)",
                                 (name, holder, now, now + ttl))
                    lease = make_lease(name, holder, 1, now, now + ttl, False, now)
                else:
                    held_by, epoch, since, expires, released = row
                    if held_by == holder and not released:  # renewal keeps the epoch
                        conn.execute(f"UPDATE {leases} SET expires_at = ? WHERE name = ?", (now + ttl, name))
                        lease = make_lease(name, holder, epoch, since, now + ttl, False, now)
                    elif released or expires <= now or takeover:
                        conn.execute(f"UPDATE {leases} SET holder = ?, epoch = ?, acquired_at = ?, "
                                     "expires_at = ?, released = 0 WHERE name = ?",
                                     (holder, epoch + 1, now, now + ttl, name))
                        lease = make_lease(name, holder, epoch + 1, now, now + ttl, False, now)
                    else:
                        lease = make_lease(name, held_by, epoch, since, expires, False, now)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return lease

        return await self._run(acquire)

    async def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        """Give ``name`` up at once, keeping its epoch; False when it is not ours anymore."""
        check_lease_args(name, holder)
        leases = f"{self._table}_leases"
        return await self._run(lambda conn: conn.execute(
            f"UPDATE {leases} SET released = 1, expires_at = ? "
            "WHERE name = ? AND holder = ? AND epoch = ? AND released = 0",
            (time.time(), name, holder, epoch)).rowcount == 1)

    async def read_lease(self, name: str) -> Lease | None:
        """The lease ``name`` as stored, or None when nobody ever took it."""
        check_lease_args(name, "reader")
        leases = f"{self._table}_leases"

        def read(conn: sqlite3.Connection) -> Lease | None:
            row = conn.execute(f"SELECT holder, epoch, acquired_at, expires_at, released FROM {leases} "
                               "WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            holder, epoch, since, expires, released = row
            return make_lease(name, holder, epoch, since, expires, released, time.time())

        return await self._run(read)

    async def ping(self) -> None:
        """Open the database (creating it unless ``create=False``) and run ``SELECT 1``.

        Raises:
            StorageError: it cannot be opened or is not a keyhive SQLite database; the
                message names the path, the driver's exception is ``__cause__``.
        """
        try:
            await self._run(lambda conn: conn.execute("SELECT 1").fetchone())
        except StorageError as exc:
            cause = exc.__cause__
            if cause is None:  # closed
                raise
            raise StorageError(
                f"cannot open SQLite database {self.path!r}: {cause}; check that the path is "
                "right, that its directory exists and is writable, and that the file is a "
                "SQLite database"
            ) from cause

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[StoredKey]:
        """Every key starting with ``prefix``, in key order, read in pages of 1,000."""
        table = self._table
        upper = _after_prefix(prefix)
        after = ""
        first = True
        while True:
            def page(conn: sqlite3.Connection, after: str = after, first: bool = first) -> list[Any]:
                op = ">=" if first else ">"
                bound = "" if upper is None else "AND key < ? "
                args: tuple[Any, ...] = (prefix if first else after,)
                if upper is not None:
                    args += (upper,)
                return conn.execute(
                    f"SELECT key, version, length(data), updated_at FROM {table} "
                    f"WHERE key {op} ? {bound}AND substr(key, 1, ?) = ? ORDER BY key LIMIT 1000",
                    (*args, len(prefix), prefix),
                ).fetchall()

            rows = await self._run(page)
            for key, version, size, updated in rows:
                yield StoredKey(key, version, size, updated)
            if len(rows) < 1000:
                return
            after, first = rows[-1][0], False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        executor = self._executor
        if executor is None:
            return

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, close)
        executor.shutdown(wait=False)

"""keyhive._stored on every backend: listing a manager's checkpoints, exists, ping, create=False."""

from __future__ import annotations

import gc
import os
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest

import keyhive
from keyhive._keys import storage_key
from keyhive._stored import ALL, StoredRecord, exists, stored_keys
from keyhive.storage import SaveItem
from keyhive.storage.sqlite import SQLiteStorage

from . import servers

KEYS = ["alice", 7, ("room", 7), b"\x00raw", uuid.UUID(int=5), ""]
PARTITIONS = [None, "tenant-1", ("t", 1), 3]


async def _fill(storage: Any) -> None:
    for manager in ("m1", "m2"):
        for partition in PARTITIONS:
            for n, key in enumerate(KEYS):
                await storage.save(storage_key(manager, partition, key), b"x" * n, expected_version=None)
    await storage.save("not a keyhive key", b"foreign", expected_version=None)


async def test_stored_keys_lists_one_manager_decoded(storage: Any) -> None:
    """stored_keys yields every checkpoint of one manager with its user key, partition, version, size."""
    await _fill(storage)
    await storage.save(storage_key("m1", None, "alice"), b"abc", expected_version=1)
    records = [r async for r in stored_keys(storage, "m1")]
    assert all(isinstance(r, StoredRecord) for r in records)
    assert sorted((repr(r.partition), repr(r.key)) for r in records) == sorted(
        (repr(p), repr(k)) for p in PARTITIONS for k in KEYS)
    alice = next(r for r in records if r.key == "alice" and r.partition is None)
    assert (alice.version, alice.size) == (2, 3)
    room = next(r for r in records if r.key == ("room", 7) and r.partition == ("t", 1))
    assert (room.version, room.size) == (1, 2)
    assert all(r.updated_at is None or r.updated_at > 1e9 for r in records)


async def test_stored_keys_filters_by_partition(storage: Any) -> None:
    """partition=None lists the default partition only; a partition lists just itself; ALL lists all."""
    await _fill(storage)
    for partition in PARTITIONS:
        found = [r async for r in stored_keys(storage, "m2", partition=partition)]
        assert {r.partition for r in found} == {partition}
        assert sorted(map(repr, (r.key for r in found))) == sorted(map(repr, KEYS))
    assert len([r async for r in stored_keys(storage, "m2", partition=ALL)]) == len(KEYS) * len(PARTITIONS)
    assert [r async for r in stored_keys(storage, "m3")] == []


async def test_stored_keys_refuses_bad_arguments(storage: Any) -> None:
    """A non-str manager, a bad partition or a storage without iter_keys is a TypeError saying why."""
    with pytest.raises(TypeError, match="manager must be"):
        [r async for r in stored_keys(storage, 7)]  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="partition must be"):
        [r async for r in stored_keys(storage, "m", partition=1.5)]

    class Bare:
        async def load(self, key: str) -> None: ...

    with pytest.raises(TypeError, match="iter_keys"):
        [r async for r in stored_keys(Bare(), "m")]


async def test_exists_on_every_backend(storage: Any) -> None:
    """exists is true exactly for stored checkpoints, whatever the key type and partition."""
    await _fill(storage)
    for partition in PARTITIONS:
        for key in KEYS:
            assert await exists(storage, "m1", partition, key)
    assert not await exists(storage, "m1", None, "bob")
    assert not await exists(storage, "m3", None, "alice")
    assert not await exists(storage, "m1", "tenant-2", "alice")
    with pytest.raises(TypeError, match="key must be"):
        await exists(storage, "m1", None, 1.5)


async def test_exists_uses_the_backend_method_unless_load_is_overridden() -> None:
    """A backend's own exists() is used, but a subclass overriding load() is asked through load()."""
    calls: list[str] = []

    class WithExists(keyhive.MemoryStorage):
        async def exists(self, key: str) -> bool:
            calls.append("exists")
            return await self.load(key) is not None

    class LoadOverride(WithExists):
        async def load(self, key: str) -> Any:
            calls.append("load")
            return await super().load(key)

    first = WithExists()
    await first.save(storage_key("m", None, "k"), b"x", expected_version=None)
    assert await exists(first, "m", None, "k")
    assert calls == ["exists"]
    calls.clear()
    second = LoadOverride()
    await second.save(storage_key("m", None, "k"), b"x", expected_version=None)
    assert await exists(second, "m", None, "k")
    assert calls == ["load"]


async def test_a_user_backends_listing_error_becomes_storage_error() -> None:
    """Whatever a user-written iter_keys raises reaches the caller as StorageError with it as __cause__."""

    class Broken(keyhive.MemoryStorage):
        async def iter_keys(self, prefix: str = "") -> Any:
            raise ConnectionResetError("gone")
            yield  # pragma: no cover

    with pytest.raises(keyhive.StorageError) as info:
        [r async for r in stored_keys(Broken(), "m")]
    assert isinstance(info.value.__cause__, ConnectionResetError)


@pytest.mark.timeout(300)
async def test_100k_sqlite_keys_stream_in_constant_memory(tmp_path: Path) -> None:
    """Listing 100,000 SQLite checkpoints holds one page at a time: the tracemalloc peak stays small."""
    storage = SQLiteStorage(tmp_path / "big.db")
    try:
        for start in range(0, 100_000, 10_000):
            results = await storage.save_many([
                SaveItem(storage_key("big", None, f"user-{i:06}"), b"s" * 100, None)
                for i in range(start, start + 10_000)])
            assert results == [1] * 10_000
        await storage.save(storage_key("other", None, "x"), b"x", expected_version=None)
        gc.collect()
        tracemalloc.start()
        try:
            count = 0
            total = 0
            async for record in stored_keys(storage, "big"):
                count += 1
                total += record.size
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (count, total) == (100_000, 10_000_000)
        # Everything at once would be > 20 MB of records; one page of 1,000 is well under 2 MB.
        assert peak < 2_000_000, f"peak {peak:,} bytes"
    finally:
        await storage.aclose()


# -- ping -------------------------------------------------------------------------------------------


async def test_ping_succeeds_on_every_backend(storage: Any) -> None:
    """ping() is one cheap round trip that succeeds on a working backend and fails once closed."""
    await storage.ping()
    await storage.ping()
    await storage.aclose()
    with pytest.raises(keyhive.StorageError):
        await storage.ping()


async def test_ping_names_the_sqlite_path(tmp_path: Path) -> None:
    """An SQLite file in a missing directory, or one that is not SQLite, fails ping naming the path."""
    missing = SQLiteStorage(tmp_path / "nodir" / "x.db")
    with pytest.raises(keyhive.StorageError, match=r"nodir.*check that") as info:
        await missing.ping()
    assert isinstance(info.value.__cause__, OSError)
    await missing.aclose()
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a database" * 100)
    bad = SQLiteStorage(text)
    with pytest.raises(keyhive.StorageError, match=r"notes.txt.*not a database") as info:
        await bad.ping()
    assert info.value.__cause__ is not None
    await bad.aclose()
    assert text.read_bytes() == b"not a database" * 100


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
async def test_ping_names_an_unwritable_directory(tmp_path: Path) -> None:
    """FileStorage.ping fails on a read-only directory, naming it and the OS error."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(keyhive.StorageError, match=r"ro.*not writable") as info:
            await keyhive.FileStorage(ro).ping()
        assert isinstance(info.value.__cause__, PermissionError)
    finally:
        ro.chmod(0o700)


async def test_ping_names_a_missing_directory(tmp_path: Path) -> None:
    """FileStorage(create=False).ping on a missing directory fails naming it, and creates nothing."""
    with pytest.raises(keyhive.StorageError, match=r"nope.*check that the path") as info:
        await keyhive.FileStorage(tmp_path / "nope", create=False).ping()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert not (tmp_path / "nope").exists()


async def test_redis_ping_names_host_and_port() -> None:
    """Redis ping against a port nobody listens on names host:port and what to check."""
    pytest.importorskip("redis")
    from keyhive.storage.redis import RedisStorage

    port = servers.free_port()
    storage = RedisStorage.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(keyhive.StorageError, match=f"127.0.0.1:{port}.*is the server running") as info:
            await storage.ping()
        assert info.value.__cause__ is not None
    finally:
        await storage.aclose()


async def test_postgres_ping_names_host_and_port() -> None:
    """PostgreSQL ping against a port nobody listens on names host:port and what to check."""
    pytest.importorskip("asyncpg")
    from keyhive.storage.postgres import PostgresStorage

    port = servers.free_port()
    storage = PostgresStorage.from_url(f"postgresql://u:pw@127.0.0.1:{port}/db")
    try:
        with pytest.raises(keyhive.StorageError, match=f"127.0.0.1:{port}/db.*is the server running") as info:
            await storage.ping()
        assert isinstance(info.value.__cause__, OSError)
    finally:
        await storage.aclose()


# -- create=False --------------------------------------------------------------------------------


async def test_sqlite_create_false_never_creates(tmp_path: Path) -> None:
    """SQLiteStorage(create=False) refuses a missing file naming it and creates no file and no table."""
    path = tmp_path / "nope.db"
    storage = SQLiteStorage(path, create=False)
    with pytest.raises(keyhive.StorageError, match=r"nope.db"):
        [k async for k in storage.iter_keys()]
    await storage.aclose()
    assert not path.exists()
    import sqlite3

    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    other = SQLiteStorage(tmp_path / "other.db", create=False)
    with pytest.raises(keyhive.StorageError, match="without a keyhive_checkpoints table"):
        await other.load("k")
    await other.aclose()
    tables = sqlite3.connect(tmp_path / "other.db").execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("t",)]


async def test_sqlite_create_false_reads_an_existing_database(tmp_path: Path) -> None:
    """create=False opens an existing keyhive database as usual (also as the URL option ?create=false)."""
    writer = SQLiteStorage(tmp_path / "db.sqlite")
    await writer.save("k", b"v", expected_version=None)
    await writer.aclose()
    reader = keyhive.storage.from_url(f"sqlite:///{tmp_path}/db.sqlite?create=false")
    assert reader.create is False
    assert [k.key async for k in reader.iter_keys()] == ["k"]
    assert (await reader.load("k")).data == b"v"
    await reader.aclose()
    with pytest.raises(ValueError, match="create must be true or false"):
        keyhive.storage.from_url(f"sqlite:///{tmp_path}/db.sqlite?create=maybe")


async def test_file_create_false_never_creates(tmp_path: Path) -> None:
    """FileStorage(create=False) refuses a missing directory naming it, and makes none."""
    storage = keyhive.FileStorage(tmp_path / "typo", create=False)
    with pytest.raises(FileNotFoundError, match="typo"):
        [k async for k in storage.iter_keys()]
    with pytest.raises(FileNotFoundError, match="typo"):
        await storage.load("k")
    assert not (tmp_path / "typo").exists()
    writer = keyhive.FileStorage(tmp_path / "ok")
    await writer.save("k", b"v", expected_version=None)
    reader = keyhive.FileStorage(tmp_path / "ok", create=False)
    assert [(k.key, k.size) async for k in reader.iter_keys()] == [("k", 1)]

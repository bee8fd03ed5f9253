"""One fixture, every backend: the contract suite runs against each real backend."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import keyhive
from keyhive.storage.sqlite import SQLiteStorage

BACKENDS = ["memory", "file", "sqlite", "redis", "postgres"]


async def _make(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if kind == "memory":
        return keyhive.MemoryStorage()
    if kind == "file":
        return keyhive.FileStorage(tmp_path / "ckpt")
    if kind == "sqlite":
        return SQLiteStorage(tmp_path / "ckpt.db")
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        from keyhive.storage.redis import RedisStorage

        return RedisStorage.from_url(server.url, key_prefix=f"test-{uuid.uuid4().hex}:")
    if kind == "postgres":
        server = request.getfixturevalue("postgres_server")
        from keyhive.storage.postgres import PostgresStorage

        return PostgresStorage.from_url(server.url, table=f"t_{uuid.uuid4().hex}")
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh, empty backend of each kind."""
    backend = await _make(request.param, tmp_path, request)
    try:
        yield backend
    finally:
        await backend.aclose()


LEASE_BACKENDS = ["file", "sqlite", "redis", "postgres"]


@pytest.fixture(params=LEASE_BACKENDS)
async def lease_storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A fresh backend of each kind that keeps leases (every one but memory)."""
    backend = await _make(request.param, tmp_path, request)
    try:
        yield backend
    finally:
        await backend.aclose()


def second_handle(backend: Any) -> Any:
    """Another client on the same data as ``backend`` (its own connection, file handle or pool)."""
    if isinstance(backend, keyhive.FileStorage):
        return keyhive.FileStorage(backend.directory)
    if isinstance(backend, SQLiteStorage):
        return SQLiteStorage(backend.path)
    from keyhive.storage.postgres import PostgresStorage
    from keyhive.storage.redis import RedisStorage

    if isinstance(backend, RedisStorage):
        kwargs = backend._client.connection_pool.connection_kwargs
        url = f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
        return RedisStorage.from_url(url, key_prefix=backend.key_prefix)
    if isinstance(backend, PostgresStorage):
        return PostgresStorage(backend._dsn, table=backend.table)
    raise AssertionError(backend)


@pytest.fixture
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Any]:
    """Build a backend of a given kind (for tests that need a second handle on the same data)."""

    async def make(kind: str) -> Any:
        return await _make(kind, tmp_path, request)

    # Same tmp_path, so file and sqlite handles share data; redis/postgres get fresh scopes.

    return make  # type: ignore[return-value]


# redis_server and postgres_server (session fixtures) live in tests/conftest.py: one server
# per session for every directory that needs one.

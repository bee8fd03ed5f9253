"""A subclass that overrides save or load is honoured by every shipped backend (SPEC §7).

An "encrypting" subclass (XOR in ``save``, undone in ``load``) of each backend carries a
hibernate storm of 50 agents and their thaw, and what the inner backend stores is the
encrypted bytes; a counting subclass sees every write. No batched or optional method of a
backend may bypass the override.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

import keyhive
from keyhive._keys import storage_key
from keyhive.codecs import unpack
from keyhive.storage.sqlite import SQLiteStorage
from keyhive.testing import EventRecorder

from .conftest import BACKENDS

_MASK = 0x5A


def _xor(data: bytes) -> bytes:
    return bytes(b ^ _MASK for b in data)


def _base(kind: str) -> type[Any]:
    if kind == "memory":
        return keyhive.MemoryStorage
    if kind == "file":
        return keyhive.FileStorage
    if kind == "sqlite":
        return SQLiteStorage
    if kind == "redis":
        from keyhive.storage.redis import RedisStorage

        return RedisStorage
    from keyhive.storage.postgres import PostgresStorage

    return PostgresStorage


def _build(cls: type[Any], kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if kind == "memory":
        return cls()
    if kind == "file":
        return cls(tmp_path / "ckpt")
    if kind == "sqlite":
        return cls(tmp_path / "ckpt.db")
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        return cls.from_url(server.url, key_prefix=f"test-{uuid.uuid4().hex}:")
    server = request.getfixturevalue("postgres_server")
    return cls.from_url(server.url, table=f"t_{uuid.uuid4().hex}")


def _encrypting(base: type[Any]) -> type[Any]:
    class Encrypting(base):  # type: ignore[misc, valid-type]
        async def save(self, key: str, data: bytes, *, expected_version: int | None, **kw: Any) -> int:
            version: int = await super().save(key, _xor(data), expected_version=expected_version, **kw)
            return version

        async def load(self, key: str) -> Any:
            cp = await super().load(key)
            return None if cp is None else keyhive.Checkpoint(_xor(cp.data), cp.version)

        async def raw(self, key: str) -> Any:
            return await super().load(key)

    return Encrypting


def _counting(base: type[Any]) -> type[Any]:
    class Counting(base):  # type: ignore[misc, valid-type]
        writes = 0
        loads = 0

        async def save(self, key: str, data: bytes, *, expected_version: int | None, **kw: Any) -> int:
            type(self).writes += 1
            version: int = await super().save(key, data, expected_version=expected_version, **kw)
            return version

        async def load(self, key: str) -> Any:
            type(self).loads += 1
            return await super().load(key)

    return Counting


class Tally(keyhive.Agent):
    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"n": 0}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["n"] += 1
        return self.state["n"]


async def _storm(storage: Any, n: int = 50) -> str:
    """50 agents changed, hibernated together on idle timeout, then thawed."""
    name = f"sub-{uuid.uuid4().hex[:8]}"
    keys = [f"k{i}" for i in range(n)]
    async with keyhive.InstanceManager(name, Tally, storage=storage, idle_timeout=0.3) as m:  # real time: real I/O
        events = EventRecorder(m)
        for key in keys:
            await m.call(key, "incr")
        await events.wait_count("hibernated", n, timeout=20)
        assert (await m.stats()).total == 0
        thawed = await asyncio.gather(*(m.call(key, "incr") for key in keys))
        assert thawed == [2] * n  # every thaw read its checkpoint back through the override
        assert events.count("thawed") == n
    return name


@pytest.mark.parametrize("kind", BACKENDS)
async def test_encrypting_subclass_round_trips_a_hibernate_storm(kind: str, tmp_path: Path,
                                                                 request: pytest.FixtureRequest) -> None:
    """Every write goes through the subclass's save and every thaw through its load: the inner
    backend holds only the encrypted bytes."""
    storage = _build(_encrypting(_base(kind)), kind, tmp_path, request)
    try:
        name = await _storm(storage)
        for i in range(50):
            raw = await storage.raw(storage_key(name, None, f"k{i}"))
            assert raw is not None
            with pytest.raises(keyhive.CodecError):
                unpack(raw.data)  # encrypted: not a readable envelope
            assert unpack(_xor(raw.data)).payload is not None
    finally:
        await storage.aclose()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_counting_subclass_counts_every_write(kind: str, tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    """A subclass counting its save calls sees one per checkpoint written: 50 at the storm,
    50 more when close saves the thawed and changed agents."""
    storage = _build(_counting(_base(kind)), kind, tmp_path, request)
    try:
        await _storm(storage)
        assert type(storage).writes == 100
        assert type(storage).loads >= 100  # every fresh start and every thaw looked
    finally:
        await storage.aclose()

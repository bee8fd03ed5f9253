"""Retention helpers (SPEC §13): stale_keys and delete_if on every backend, on real servers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from keyhive import Checkpoint


async def _written_in_order(storage: Any, keys: list[str]) -> None:
    for key in keys:
        await storage.save(key, b"x" * 3, expected_version=None)
        await asyncio.sleep(0.01)  # distinct write times on every clock


async def test_stale_keys_oldest_first_with_limit(storage: Any) -> None:
    """stale_keys lists checkpoints written before older_than, oldest first, at most limit."""
    await _written_in_order(storage, ["p/c", "p/a", "p/b"])
    cutoff = time.time() + 0.001
    await asyncio.sleep(0.02)
    await storage.save("p/new", b"x", expected_version=None)
    stale = await storage.stale_keys("p/", cutoff)
    assert [s.key for s in stale] == ["p/c", "p/a", "p/b"]
    assert all((s.version, s.size) == (1, 3) for s in stale)
    assert [s.updated_at for s in stale] == sorted(s.updated_at for s in stale)
    assert [s.key for s in await storage.stale_keys("p/", cutoff, limit=2)] == ["p/c", "p/a"]
    assert await storage.stale_keys("p/", 0.0) == []


async def test_a_write_makes_a_key_fresh(storage: Any) -> None:
    """A checkpoint written again after older_than is no longer stale."""
    await _written_in_order(storage, ["a", "b"])
    await asyncio.sleep(0.02)
    cutoff = time.time()
    await asyncio.sleep(0.02)
    await storage.save("a", b"y", expected_version=1)
    assert [s.key for s in await storage.stale_keys("", cutoff)] == ["b"]


async def test_stale_keys_prefix_isolation(storage: Any) -> None:
    """stale_keys of one prefix never reports another's checkpoints."""
    await _written_in_order(storage, ["x/1", "y/1", "x/2"])
    assert [s.key for s in await storage.stale_keys("x/", time.time() + 1)] == ["x/1", "x/2"]


async def test_delete_if_refuses_a_changed_version(storage: Any) -> None:
    """delete_if removes a checkpoint only while it still has the version the caller saw."""
    await storage.save("k", b"1", expected_version=None, due=5.0)
    await storage.save("k", b"2", expected_version=1, due=5.0)
    assert await storage.delete_if("k", 1) is False
    assert await storage.load("k") == Checkpoint(b"2", 2)
    assert await storage.due_keys("", 10.0) == [("k", 5.0)]
    assert await storage.delete_if("k", 2) is True
    assert await storage.load("k") is None
    assert await storage.due_keys("", 10.0) == []
    assert await storage.stale_keys("", time.time() + 60) == []
    assert await storage.delete_if("k", 2) is False


async def test_bad_limit(storage: Any) -> None:
    """stale_keys with a limit below 1 is a ValueError."""
    with pytest.raises(ValueError, match="limit"):
        await storage.stale_keys("", time.time(), limit=0)

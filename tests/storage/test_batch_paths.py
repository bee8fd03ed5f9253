"""save_many's batch paths on every backend: the conflict-free batch, its fallback, due times in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import keyhive
from keyhive import SaveItem
from keyhive.storage import Checkpoint, Fence


async def test_a_conflict_free_batch_of_inserts_and_updates(storage: Any) -> None:
    """A batch of new keys and updates, none conflicting, writes each with its version, data and due time."""
    for i in range(0, 40, 2):
        await storage.save(f"k{i}", b"old", expected_version=None)
    items = [SaveItem(f"k{i}", f"new{i}".encode(), 1 if i % 2 == 0 else None) for i in range(40)]
    dues = [float(i) if i % 3 == 0 else None for i in range(40)]
    results = await storage.save_many(items, due=dues)
    assert results == [2 if i % 2 == 0 else 1 for i in range(40)]
    for i in range(40):
        assert await storage.load(f"k{i}") == Checkpoint(f"new{i}".encode(), results[i])
    assert await storage.due_keys("", 100.0, limit=100) == [(f"k{i}", float(i)) for i in range(0, 40, 3)]


async def test_one_conflict_at_the_end_of_a_batch_writes_the_others_once(storage: Any) -> None:
    """A batch whose last item conflicts writes every other item exactly once and reports that one."""
    for i in range(10):
        await storage.save(f"k{i}", b"v1", expected_version=None)
    items = [SaveItem(f"k{i}", b"v2", 1) for i in range(10)] + [SaveItem("k0x", b"x", 3)]
    results = await storage.save_many(items)
    assert results[:10] == [2] * 10
    assert isinstance(results[10], keyhive.ConflictError)
    for i in range(10):
        assert await storage.load(f"k{i}") == Checkpoint(b"v2", 2)
    assert await storage.load("k0x") is None


async def test_a_key_twice_in_a_batch_ends_with_the_second_due_time(storage: Any) -> None:
    """The same key written twice in one batch, first with a due time then without, is left with none."""
    results = await storage.save_many([SaveItem("a", b"1", None), SaveItem("a", b"2", 1),
                                       SaveItem("b", b"1", None)], due=[5.0, None, None])
    assert results == [1, 2, 1]
    assert await storage.due_keys("", 100.0) == []
    assert await storage.load("a") == Checkpoint(b"2", 2)
    results = await storage.save_many([SaveItem("b", b"2", 1), SaveItem("b", b"3", 2)], due=[None, 7.0])
    assert results == [2, 3]
    assert await storage.due_keys("", 100.0) == [("b", 7.0)]


@pytest.mark.parametrize("update_from", [True, False])
async def test_sqlite_batch_sizes_and_old_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 update_from: bool) -> None:
    """SQLite writes batches of any size through its statement chunks, also without UPDATE … FROM."""
    from keyhive.storage import sqlite

    monkeypatch.setattr(sqlite, "_UPDATE_FROM", update_from)
    storage = sqlite.SQLiteStorage(tmp_path / "b.db")
    try:
        for size in (1, 2, 3, 127, 128, 129, 300, 513):
            keys = [f"s{size}-{i}" for i in range(size)]
            assert await storage.save_many([SaveItem(k, b"a", None) for k in keys]) == [1] * size
            dues = [1.0 if i % 2 else None for i in range(size)]
            assert await storage.save_many([SaveItem(k, k.encode(), 1) for k in keys], due=dues) == [2] * size
            for k in keys[:: max(1, size // 7)]:
                assert await storage.load(k) == Checkpoint(k.encode(), 2)
            assert len(await storage.due_keys(f"s{size}-", 10.0, limit=1000)) == size // 2
    finally:
        await storage.aclose()


async def test_a_fenced_batch_with_a_conflict_writes_the_others(lease_storage: Any) -> None:
    """Under a held lease, a batch with one conflicting item writes every other item once."""
    lease = await lease_storage.acquire_lease("m", "me", 30.0)
    fence = Fence("m", lease.epoch)
    await lease_storage.save("k0", b"v1", expected_version=None)
    items = [SaveItem("k0", b"v2", 1), SaveItem("k1", b"v1", None), SaveItem("k2", b"x", 4)]
    results = await lease_storage.save_many(items, fence=fence)
    assert results[:2] == [2, 1] and isinstance(results[2], keyhive.ConflictError)
    assert await lease_storage.load("k0") == Checkpoint(b"v2", 2)
    assert await lease_storage.load("k1") == Checkpoint(b"v1", 1)
    assert await lease_storage.load("k2") is None

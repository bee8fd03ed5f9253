"""save_many's batch paths on every backend: the conflict-free batch, its fallback, due times in one batch."""

from __future__ import annotations

from typing import Any

import keyhive
from keyhive import SaveItem
from keyhive.storage import Checkpoint


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

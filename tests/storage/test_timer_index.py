"""The due-time index (SPEC §12) on every backend, on real servers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import keyhive
from keyhive import SaveItem
from keyhive.storage.sqlite import SQLiteStorage


async def test_set_replace_clear(storage: Any) -> None:
    """A save's due time is indexed, a later save replaces it, and a save with due=None clears it."""
    await storage.save("k", b"1", expected_version=None, due=50.0)
    assert await storage.due_keys("", 100.0) == [("k", 50.0)]
    await storage.save("k", b"2", expected_version=1, due=70.0)
    assert await storage.due_keys("", 100.0) == [("k", 70.0)]
    assert await storage.due_keys("", 60.0) == []
    await storage.save("k", b"3", expected_version=2)
    assert await storage.due_keys("", 100.0) == []


async def test_conflict_leaves_the_index(storage: Any) -> None:
    """A save that loses its compare-and-set leaves the key's due time as it was."""
    await storage.save("k", b"1", expected_version=None, due=50.0)
    with pytest.raises(keyhive.ConflictError):
        await storage.save("k", b"2", expected_version=7, due=10.0)
    assert await storage.due_keys("", 100.0) == [("k", 50.0)]


async def test_delete_removes_from_the_index(storage: Any) -> None:
    """delete and a successful delete_if take the key out of the index."""
    await storage.save("a", b"1", expected_version=None, due=1.0)
    await storage.save("b", b"1", expected_version=None, due=2.0)
    assert await storage.delete("a") is True
    assert await storage.due_keys("", 10.0) == [("b", 2.0)]
    assert await storage.delete_if("b", 1) is True
    assert await storage.due_keys("", 10.0) == []


async def test_order_limit_and_until(storage: Any) -> None:
    """due_keys returns keys with due <= until, earliest first, at most limit of them."""
    dues = [7.5, 3.0, 9.0, 1.25, 5.0, 11.0]
    for i, due in enumerate(dues):
        await storage.save(f"k{i}", b"x", expected_version=None, due=due)
    assert await storage.due_keys("", 9.0) == [("k3", 1.25), ("k1", 3.0), ("k4", 5.0), ("k0", 7.5),
                                               ("k2", 9.0)]
    assert await storage.due_keys("", 100.0, limit=2) == [("k3", 1.25), ("k1", 3.0)]
    assert await storage.due_keys("", 1.0) == []
    with pytest.raises(ValueError, match="limit"):
        await storage.due_keys("", 1.0, limit=0)


async def test_prefix_isolation(storage: Any) -> None:
    """due_keys of one prefix never reports keys of another, however early they are due."""
    for i in range(30):
        await storage.save(f"other/{i}", b"x", expected_version=None, due=float(i))
    await storage.save("mine/a", b"x", expected_version=None, due=100.0)
    await storage.save("mine/b", b"x", expected_version=None, due=50.0)
    assert await storage.due_keys("mine/", 1000.0, limit=5) == [("mine/b", 50.0), ("mine/a", 100.0)]
    assert len(await storage.due_keys("other/", 1000.0)) == 30


async def test_save_many_due_per_item(storage: Any) -> None:
    """save_many sets each item's own due time, clears it for None, and skips items that conflict."""
    await storage.save("c", b"x", expected_version=None, due=9.0)
    results = await storage.save_many([SaveItem("a", b"1", None), SaveItem("b", b"1", None),
                                       SaveItem("c", b"2", 1), SaveItem("d", b"1", 5)],
                                      due=[2.0, 1.0, None, 0.5])
    assert results[:3] == [1, 1, 2] and isinstance(results[3], keyhive.ConflictError)
    assert await storage.due_keys("", 10.0) == [("b", 1.0), ("a", 2.0)]
    await storage.save_many([SaveItem("a", b"2", 1)])  # due omitted: no item is due
    assert await storage.due_keys("", 10.0) == [("b", 1.0)]


async def test_bad_due_arguments(storage: Any) -> None:
    """A due that is not a finite number, or a due list of the wrong length, is refused before writing."""
    with pytest.raises(TypeError, match="seconds since the epoch"):
        await storage.save("k", b"x", expected_version=None, due="soon")
    with pytest.raises(ValueError, match="finite"):
        await storage.save("k", b"x", expected_version=None, due=float("nan"))
    with pytest.raises(ValueError, match="one per item"):
        await storage.save_many([SaveItem("k", b"x", None)], due=[1.0, 2.0])
    assert await storage.load("k") is None


async def _fill(storage: Any, n: int) -> None:
    batch = 10_000
    for start in range(0, n, batch):
        items = [SaveItem(f"t/{i:06d}", b"x", None) for i in range(start, start + batch)]
        # Due times interleaved with the key order, so order must come from the index.
        await storage.save_many(items, due=[float((i * 7919) % n) for i in range(start, start + batch)])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_hundred_thousand_entries(kind: str, tmp_path: Path) -> None:
    """One index of 100,000 due times answers the earliest 1,000 in order, without a full scan."""
    storage: Any = keyhive.MemoryStorage() if kind == "memory" else SQLiteStorage(tmp_path / "big.db")
    try:
        n = 100_000
        await _fill(storage, n)
        await storage.save("u/only", b"x", expected_version=None, due=float(n) + 1)
        started = time.perf_counter()
        due = await storage.due_keys("t/", float(n))
        elapsed = time.perf_counter() - started
        assert [d for _, d in due] == [float(i) for i in range(1000)]
        assert due[0] == ("t/000000", 0.0)
        assert await storage.due_keys("t/", 499.5, limit=10_000) == due[:500]
        assert await storage.due_keys("u/", 1e9) == [("u/only", float(n) + 1)]
        assert elapsed < 2.0, f"due_keys took {elapsed:.2f}s"
        if kind == "sqlite":
            def plan(conn: Any) -> str:
                rows = conn.execute("EXPLAIN QUERY PLAN SELECT key, due FROM keyhive_checkpoints "
                                    "INDEXED BY keyhive_checkpoints_due WHERE due IS NOT NULL AND due <= 5 "
                                    "ORDER BY due, key LIMIT 10").fetchall()
                return " ".join(str(r[-1]) for r in rows)

            assert "INDEX keyhive_checkpoints_due (due>? AND due<?)" in await storage._run(plan)
    finally:
        await storage.aclose()


async def test_old_sqlite_table_gets_the_due_column(tmp_path: Path) -> None:
    """A file made before the due index gains the column on open and keeps its checkpoints."""
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE keyhive_checkpoints (key TEXT PRIMARY KEY, data BLOB NOT NULL, "
                 "version INTEGER NOT NULL, updated_at REAL NOT NULL) WITHOUT ROWID")
    conn.execute("INSERT INTO keyhive_checkpoints VALUES ('k', x'01', 3, 1.0)")
    conn.commit()
    conn.close()
    storage = SQLiteStorage(path)
    try:
        assert await storage.load("k") == keyhive.Checkpoint(b"\x01", 3)
        assert await storage.save("k", b"\x02", expected_version=3, due=4.0) == 4
        assert await storage.due_keys("", 5.0) == [("k", 4.0)]
    finally:
        await storage.aclose()

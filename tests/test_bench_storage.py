"""The storage storm benchmark runs end to end (small N, SQLite): it must not rot."""

from __future__ import annotations

import pytest

bench_storage = pytest.importorskip("bench.storage")


async def test_storage_storms_run_on_sqlite() -> None:
    """S1 and S2 on SQLite give a positive rate for keyhive and for the backend floor."""
    rows = await bench_storage.run_backend("sqlite", quick=True, n=300)
    assert [(r["workload"], r["impl"]) for r in rows] == [
        ("S1 hibernate storm (sqlite)", "keyhive"), ("S1 hibernate storm (sqlite)", "floor"),
        ("S2 thaw storm (sqlite)", "keyhive"), ("S2 thaw storm (sqlite)", "floor"),
    ]
    assert all(r["value"] > 0 and r["n"] == 300 and r["unit"] == "ops/s" for r in rows)

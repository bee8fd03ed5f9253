"""Regression tests: backends opened by many clients at once on fresh storage (real processes, real servers)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from keyhive import StorageError

ROUNDS = 30

_SQLITE_CHILD = textwrap.dedent("""
    import asyncio, sys, time
    from keyhive.storage.sqlite import SQLiteStorage

    directory, start, rounds, me = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    async def main():
        failures = 0
        for r in range(rounds):
            time.sleep(max(0.0, start + 0.08 * r - time.time()))  # both processes open round r at once
            storage = SQLiteStorage(f"{directory}/{r}.db")
            try:
                await storage.save(me, b"x", expected_version=None)
            except Exception as exc:
                failures += 1
                print(f"round {r}: {exc!r}", flush=True)
            finally:
                await storage.aclose()
        print(f"failures {failures}", flush=True)

    asyncio.run(main())
""")


@pytest.mark.timeout(90)
def test_sqlite_two_processes_open_fresh_files_at_once(tmp_path: Path) -> None:
    """Two processes opening the same new SQLite file at the same instant both succeed, 30 rounds running."""
    start = time.time() + 1.5  # after both interpreters have imported keyhive
    children = [
        subprocess.Popen([sys.executable, "-c", _SQLITE_CHILD, str(tmp_path), repr(start), str(ROUNDS), who],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
        for who in ("a", "b")
    ]
    outputs = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        outputs.append(out.decode())
    assert all(child.returncode == 0 for child in children), outputs
    assert all(out.strip().endswith("failures 0") for out in outputs), outputs


@pytest.mark.timeout(60)
async def test_postgres_many_first_loads_on_a_fresh_table(postgres_server: Any) -> None:
    """80 clients whose first load creates the same new table at once all succeed."""
    from keyhive.storage.postgres import PostgresStorage

    table = f"race_{uuid.uuid4().hex}"
    clients = [PostgresStorage(postgres_server.url, table=table, pool_min=1, pool_max=1) for _ in range(80)]
    try:
        results = await asyncio.gather(*(c.load("k") for c in clients), return_exceptions=True)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    errors = [r for r in results if r is not None]
    assert errors == []


async def _connections(server: Any) -> int:
    import asyncpg

    conn = await asyncpg.connect(server.url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"))
    finally:
        await conn.close()


@pytest.mark.timeout(60)
async def test_postgres_failed_start_closes_its_pool(postgres_server: Any) -> None:
    """A client whose schema creation fails raises StorageError and keeps no connection open."""
    from keyhive.storage.postgres import PostgresStorage

    before = await _connections(postgres_server)
    clients = [PostgresStorage(postgres_server.url, table="no_such_schema.t", pool_min=2, pool_max=2)
               for _ in range(5)]
    for client in clients:
        with pytest.raises(StorageError) as caught:
            await client.load("k")
        assert caught.value.__cause__ is not None
    deadline = time.monotonic() + 5
    while (now := await _connections(postgres_server)) > before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for client in clients:
        await client.aclose()
    assert now <= before, f"{now - before} connections left open by failed starts"

"""Storage faults with real servers and real crashes: nothing acknowledged is lost or corrupted."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import keyhive
from keyhive.codecs import unpack
from keyhive.storage.sqlite import SQLiteStorage
from keyhive.testing import EventRecorder

from ..agents import Counter
from . import servers


@pytest.fixture
def own_redis() -> servers.Server:
    """A private redis-server this test may stop and start again."""
    if shutil.which("redis-server") is None:
        servers.require_or_skip("redis-server is not installed (apt-get install redis-server)")
    data_dir = tempfile.mkdtemp(prefix="keyhive-redis-")
    port = servers.free_port()
    server = servers.Server(f"redis://127.0.0.1:{port}/0", port, servers.start_redis(port, data_dir), data_dir)
    yield server
    servers.stop(server.process)
    shutil.rmtree(data_dir, ignore_errors=True)


async def test_redis_down_while_agents_idle_out(own_redis: servers.Server) -> None:
    """Redis stopped during an idle storm: agents stay alive and retry; once it is back, every state is saved."""
    from keyhive.storage.redis import RedisStorage

    storage = RedisStorage.from_url(own_redis.url + "?key_prefix=fault:")
    manager = keyhive.InstanceManager("faulty", Counter, storage=storage, idle_timeout=0.3,
                                      retry_backoff=(0.05, 0.2))
    all_stopped = asyncio.Event()
    stopped = 0

    def count_stops(event: keyhive.Event) -> None:
        nonlocal stopped
        if event.kind == "stopped":
            stopped += 1
            if stopped == 200:
                all_stopped.set()

    async with manager:
        events = EventRecorder(manager)
        manager.subscribe(count_stops)
        for i in range(200):
            assert await manager.call(i, "incr") == 1
            await manager.call(i, "incr")
        servers.stop(own_redis.process)
        await events.wait_for("hibernate_failed", timeout=5)
        await asyncio.sleep(0.3)
        assert (await manager.stats()).count == 200  # nobody dropped
        failures = sum(1 for e in events.events if e.kind == "hibernate_failed")
        assert failures >= 200
        own_redis.process = servers.start_redis(own_redis.port, own_redis.data_dir)
        await asyncio.wait_for(all_stopped.wait(), 10)
        assert (await manager.stats()).count == 0
        for i in range(0, 200, 17):
            assert await manager.call(i, "get") == 2  # thawed from what was saved
    await storage.aclose()


async def test_redis_down_on_stop_and_thaw(own_redis: servers.Server) -> None:
    """With Redis down, stop raises StorageError and keeps the agent; get of a cold key raises ThawError."""
    from keyhive.storage.redis import RedisStorage

    storage = RedisStorage.from_url(own_redis.url)
    async with keyhive.InstanceManager("down", Counter, storage=storage, close_timeout=0.2) as m:
        ref = await m.get("k")
        await ref.call("incr")
        servers.stop(own_redis.process)
        with pytest.raises(keyhive.StorageError) as info:
            await m.stop("k")
        assert info.value.__cause__ is not None
        assert ref.alive
        with pytest.raises(keyhive.ThawError):
            await m.get("cold")
        own_redis.process = servers.start_redis(own_redis.port, own_redis.data_dir)
        await m.stop("k")
        assert await m.call("k", "get") == 1
    await storage.aclose()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from keyhive import SaveItem
    from keyhive.codecs import pack
    from keyhive.storage.sqlite import SQLiteStorage

    async def main(path):
        storage = SQLiteStorage(path)
        versions = {}
        round_ = 0
        while True:
            round_ += 1
            items = [SaveItem(f"k{i}", pack(1, (b'{"round": %d, "pad": "' % round_) + b"x" * 400 + b'"}'),
                              versions.get(i)) for i in range(500)]
            results = await storage.save_many(items)
            for i, r in enumerate(results):
                versions[i] = r
            print(round_, flush=True)

    asyncio.run(main(sys.argv[1]))
""")


def _write_then_kill(path: Path) -> None:
    """Run the writer process until it has committed 20 batches, then SIGKILL it mid-batch."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout is not None
    rounds = 0
    while rounds < 20:
        line = proc.stdout.readline()
        assert line, "writer died early"
        rounds = int(line)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


async def test_kill_9_during_a_sqlite_hibernate_storm_corrupts_nothing(tmp_path: Path) -> None:
    """SIGKILL in the middle of batched writes: afterwards every checkpoint loads, whole and valid."""
    path = tmp_path / "storm.db"
    await asyncio.to_thread(_write_then_kill, path)
    storage = SQLiteStorage(path)
    try:
        seen_rounds = set()
        for i in range(500):
            checkpoint = await storage.load(f"k{i}")
            assert checkpoint is not None
            payload = unpack(checkpoint.data).payload  # raises on a torn or corrupt write
            round_ = int(payload.split(b",")[0].split(b":")[1])
            assert checkpoint.version == round_  # the version and the data belong together
            seen_rounds.add(round_)
        assert min(seen_rounds) >= 20
        assert max(seen_rounds) - min(seen_rounds) <= 1  # one transaction per batch: all or nothing
    finally:
        await storage.aclose()


async def test_two_processes_one_sqlite_file_stay_correct(tmp_path: Path) -> None:
    """Two storages on one SQLite file (as two processes would be): CAS still lets exactly one win."""
    path = tmp_path / "shared.db"
    a, b = SQLiteStorage(path), SQLiteStorage(path)
    try:
        await a.save("k", b"base", expected_version=None)
        results = await asyncio.gather(
            *(s.save("k", b"w", expected_version=1) for s in [a, b] * 10), return_exceptions=True
        )
        assert results.count(2) == 1
        assert all(isinstance(r, keyhive.ConflictError) for r in results if r != 2)
    finally:
        await a.aclose()
        await b.aclose()


async def test_unusable_sqlite_paths_fail_clearly(tmp_path: Path) -> None:
    """A file that is not SQLite, or a missing directory, raises StorageError at first use; the file is untouched."""
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"plain text " * 200)
    storage = SQLiteStorage(notes)
    with pytest.raises(keyhive.StorageError, match="not a database"):
        await storage.load("k")
    await storage.aclose()
    assert notes.read_bytes() == b"plain text " * 200
    missing = SQLiteStorage(tmp_path / "no" / "such" / "dir.db")
    with pytest.raises(keyhive.StorageError, match="does not exist"):
        await missing.save("k", b"x", expected_version=None)
    await missing.aclose()
    manager = keyhive.InstanceManager("bad-db", Counter, storage=SQLiteStorage(notes))
    with pytest.raises(keyhive.StorageError, match="not a database"):
        await manager.start()  # found at start-up (one round trip), not at the first get
    assert not manager.running
    assert notes.read_bytes() == b"plain text " * 200


async def test_read_only_directory(tmp_path: Path) -> None:
    """A database where no file can be created raises StorageError at first use.

    As root a chmod'ed directory is still writable, so root uses /proc, where nobody can
    create files.
    """
    if os.geteuid() == 0:
        path = Path("/proc/keyhive-read-only.db")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        path = ro / "x.db"
    storage = SQLiteStorage(path)
    with pytest.raises(keyhive.StorageError, match=r"unable to open|readonly|read-only"):
        await storage.save("k", b"x", expected_version=None)
    await storage.aclose()
    assert not path.exists()


async def test_postgres_wrong_credentials_and_unreachable(postgres_server: servers.Server) -> None:
    """A wrong database or an unreachable server raises StorageError at first use, naming the problem."""
    from keyhive.storage.postgres import PostgresStorage

    wrong_db = PostgresStorage.from_url(postgres_server.url.rsplit("/", 1)[0] + "/no_such_db")
    with pytest.raises(keyhive.StorageError, match="no_such_db"):
        await wrong_db.load("k")
    await wrong_db.aclose()
    nobody = PostgresStorage.from_url(f"postgresql://postgres@127.0.0.1:{servers.free_port()}/postgres")
    with pytest.raises(keyhive.StorageError):
        await nobody.load("k")
    await nobody.aclose()


async def test_redis_wrong_password(own_redis: servers.Server) -> None:
    """A wrong password raises StorageError at first use; the right one works."""
    from keyhive.storage.redis import RedisStorage

    servers.stop(own_redis.process)
    own_redis.process = servers.start_redis(own_redis.port, own_redis.data_dir, "--requirepass", "s3cret")
    wrong = RedisStorage.from_url(own_redis.url.replace("redis://", "redis://:wrong@"))
    with pytest.raises(keyhive.StorageError, match=r"(?i)auth|password"):
        await wrong.load("k")
    await wrong.aclose()
    right = RedisStorage.from_url(own_redis.url.replace("redis://", "redis://:s3cret@"))
    assert await right.save("k", b"x", expected_version=None) == 1
    await right.aclose()

"""Leases across real processes: a stopped holder is fenced out, a killed one is taken over after its TTL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from keyhive import storage as kstorage
from keyhive.storage import Fence

TTL = 0.6

# The child takes the lease, says its epoch, waits for a line on stdin, then tries a fenced write.
_CHILD = textwrap.dedent("""
    import asyncio, sys
    from keyhive import LeaseLost
    from keyhive.storage import Fence, from_url

    async def main():
        storage = from_url(sys.argv[1])
        lease = await storage.acquire_lease("shard", "child", float(sys.argv[2]))
        print(f"epoch {lease.epoch} {lease.holder}", flush=True)
        sys.stdin.readline()
        try:
            await storage.save("k", b"from-child", expected_version=None, fence=Fence("shard", lease.epoch))
            print("saved", flush=True)
        except LeaseLost:
            print("LeaseLost", flush=True)
        await storage.aclose()

    asyncio.run(main())
""")


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage URL that a child process and this test both open."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    if request.param == "redis":
        return request.getfixturevalue("redis_server").url + f"?key_prefix=proc-{uuid.uuid4().hex}:"
    return request.getfixturevalue("postgres_server").url + f"?table=proc_{uuid.uuid4().hex}"


def _reap(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
    child.communicate(timeout=10)  # waits and closes the pipes


def _spawn(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, url, repr(TTL)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=os.environ.copy())


async def _line(child: subprocess.Popen[bytes]) -> str:
    assert child.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)).decode().strip()


@pytest.mark.timeout(60)
async def test_stopped_holder_is_fenced_out_after_takeover(shared_url: str) -> None:
    """A SIGSTOPped holder whose lease was taken over after its TTL gets LeaseLost on SIGCONT and writes nothing."""
    storage: Any = kstorage.from_url(shared_url)
    child = _spawn(shared_url)
    try:
        word, first, holder = (await _line(child)).split()
        assert (word, holder) == ("epoch", "child")
        e0 = int(first)  # 1, or the server's clock on Redis
        os.kill(child.pid, signal.SIGSTOP)
        assert (await storage.acquire_lease("shard", "parent", 10)).holder == "child"  # still live
        await asyncio.sleep(TTL + 0.2)
        lease = await storage.acquire_lease("shard", "parent", 10)
        assert (lease.holder, lease.epoch) == ("parent", e0 + 1)
        os.kill(child.pid, signal.SIGCONT)
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert await _line(child) == "LeaseLost"
        assert await storage.load("k") is None
        assert await storage.save("k", b"parent", expected_version=None, fence=Fence("shard", e0 + 1)) == 1
    finally:
        _reap(child)
        await storage.aclose()


@pytest.mark.timeout(60)
async def test_killed_holder_is_taken_over_after_its_ttl(shared_url: str) -> None:
    """A SIGKILLed holder keeps its lease until its TTL runs out, then another takes it with epoch + 1."""
    storage: Any = kstorage.from_url(shared_url)
    child = _spawn(shared_url)
    try:
        word, first, holder = (await _line(child)).split()
        assert (word, holder) == ("epoch", "child")
        e0 = int(first)  # 1, or the server's clock on Redis
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert (await storage.acquire_lease("shard", "parent", 10)).holder == "child"
        await asyncio.sleep(TTL + 0.2)
        lease = await storage.acquire_lease("shard", "parent", 10)
        assert (lease.holder, lease.epoch) == ("parent", e0 + 1)
    finally:
        _reap(child)
        await storage.aclose()

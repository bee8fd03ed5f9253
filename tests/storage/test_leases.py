"""Leases and fenced writes (SPEC §10) on every backend that keeps leases, on real servers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import keyhive
from keyhive import Checkpoint, ConflictError, LeaseLost, SaveItem
from keyhive.storage import Fence, LeaseStorage

from .conftest import second_handle

TTL = 0.3  # seconds: the expiry tests wait this long on the storage's own (real) clock


async def test_backends_implement_the_protocol(lease_storage: Any) -> None:
    """Every shared backend is a LeaseStorage and a TimerIndexStorage."""
    assert isinstance(lease_storage, LeaseStorage)
    assert isinstance(lease_storage, keyhive.storage.TimerIndexStorage)


async def test_take_and_renew_keep_the_epoch(lease_storage: Any) -> None:
    """A new lease starts at epoch 1 (Redis, which can lose its data in a restart, at its clock in
    microseconds, so that no earlier holder's epoch comes back); renewing by the same holder keeps
    epoch and acquired_at."""
    assert await lease_storage.read_lease("m") is None
    first = await lease_storage.acquire_lease("m", "a", 10)
    e0 = first.epoch
    assert e0 == 1 or (type(lease_storage).__name__ == "RedisStorage" and e0 > 10**15)
    assert (first.holder, first.released) == ("a", False)
    assert 9 < first.expires_in <= 10
    again = await lease_storage.acquire_lease("m", "a", 20)
    assert (again.holder, again.epoch, again.acquired_at) == ("a", e0, first.acquired_at)
    assert 19 < again.expires_in <= 20
    stored = await lease_storage.read_lease("m")
    assert stored is not None and (stored.holder, stored.epoch) == ("a", e0)


async def test_other_holder_refused_while_live(lease_storage: Any) -> None:
    """Another holder gets the live holder's lease back and nothing changes."""
    mine = await lease_storage.acquire_lease("m", "a", 10)
    theirs = await lease_storage.acquire_lease("m", "b", 10)
    assert (theirs.holder, theirs.epoch, theirs.acquired_at) == ("a", mine.epoch, mine.acquired_at)
    stored = await lease_storage.read_lease("m")
    assert stored is not None and stored.holder == "a"


async def test_takeover_after_expiry_bumps_the_epoch(lease_storage: Any) -> None:
    """Once the lease has expired by the storage's clock, another holder takes it with epoch + 1."""
    e0 = (await lease_storage.acquire_lease("m", "a", TTL)).epoch
    await asyncio.sleep(TTL + 0.1)
    expired = await lease_storage.read_lease("m")
    assert expired is not None and expired.expires_in == 0
    taken = await lease_storage.acquire_lease("m", "b", 10)
    assert (taken.holder, taken.epoch) == ("b", e0 + 1)


async def test_forced_takeover(lease_storage: Any) -> None:
    """takeover=True takes a live lease from another holder with epoch + 1."""
    e0 = (await lease_storage.acquire_lease("m", "a", 10)).epoch
    taken = await lease_storage.acquire_lease("m", "b", 10, takeover=True)
    assert (taken.holder, taken.epoch) == ("b", e0 + 1)
    assert (await lease_storage.acquire_lease("m", "a", 10)).holder == "b"


async def test_release_then_take_bumps_the_epoch(lease_storage: Any) -> None:
    """A released lease keeps its epoch, is free at once, and the next take (even by the same holder) bumps it."""
    lease = await lease_storage.acquire_lease("m", "a", 10)
    assert await lease_storage.release_lease("m", "a", lease.epoch + 1) is False  # wrong epoch
    assert await lease_storage.release_lease("m", "b", lease.epoch) is False  # wrong holder
    assert await lease_storage.release_lease("m", "a", lease.epoch) is True
    assert await lease_storage.release_lease("m", "a", lease.epoch) is False  # already given up
    released = await lease_storage.read_lease("m")
    e0 = lease.epoch
    assert released is not None and (released.epoch, released.released) == (e0, True)
    assert (await lease_storage.acquire_lease("m", "b", 10)).epoch == e0 + 1
    assert await lease_storage.release_lease("m", "b", e0 + 1) is True
    again = await lease_storage.acquire_lease("m", "b", 10)
    assert (again.holder, again.epoch, again.released) == ("b", e0 + 2, False)


async def test_fenced_writes_land_under_the_live_epoch(lease_storage: Any) -> None:
    """save, save_many and delete with the holder's fence write as without one."""
    lease = await lease_storage.acquire_lease("m", "a", 10)
    fence = Fence("m", lease.epoch)
    assert await lease_storage.save("k", b"1", expected_version=None, fence=fence) == 1
    assert await lease_storage.save_many([SaveItem("k", b"2", 1), SaveItem("j", b"x", None)],
                                         fence=fence) == [2, 1]
    assert await lease_storage.delete("j", fence=fence) is True
    assert await lease_storage.load("k") == Checkpoint(b"2", 2)
    assert await lease_storage.load("j") is None


async def test_fenced_writes_refused_after_takeover(lease_storage: Any) -> None:
    """After a takeover, the old holder's fenced save, save_many and delete raise LeaseLost and write nothing."""
    old = Fence("m", (await lease_storage.acquire_lease("m", "a", 10)).epoch)
    await lease_storage.save("k", b"kept", expected_version=None, fence=old)
    other = second_handle(lease_storage)
    try:
        assert (await other.acquire_lease("m", "b", 10, takeover=True)).epoch == old.epoch + 1
    finally:
        await other.aclose()
    with pytest.raises(LeaseLost) as caught:
        await lease_storage.save("k", b"lost", expected_version=1, fence=old, due=5.0)
    assert isinstance(caught.value, ConflictError)
    with pytest.raises(LeaseLost):
        await lease_storage.save("new", b"lost", expected_version=None, fence=old)
    with pytest.raises(LeaseLost):
        await lease_storage.save_many([SaveItem("k", b"lost", 1), SaveItem("n2", b"lost", None)],
                                      fence=old, due=[1.0, 2.0])
    with pytest.raises(LeaseLost):
        await lease_storage.delete("k", fence=old)
    with pytest.raises(LeaseLost):
        await lease_storage.delete_if("k", 1, fence=old)
    assert await lease_storage.load("k") == Checkpoint(b"kept", 1)
    assert await lease_storage.load("new") is None
    assert await lease_storage.load("n2") is None
    assert await lease_storage.due_keys("", 1e12) == []
    # Never taken, or under a fence of another name: refused too.
    with pytest.raises(LeaseLost):
        await lease_storage.save("k", b"x", expected_version=1, fence=Fence("never", 1))


async def test_fence_under_a_released_lease_is_refused(lease_storage: Any) -> None:
    """A holder that released its lease can no longer write under its fence."""
    lease = await lease_storage.acquire_lease("m", "a", 10)
    await lease_storage.release_lease("m", "a", lease.epoch)
    with pytest.raises(LeaseLost):
        await lease_storage.save("k", b"x", expected_version=None, fence=Fence("m", lease.epoch))
    assert await lease_storage.load("k") is None


async def test_fence_check_is_atomic_with_the_write(lease_storage: Any) -> None:
    """Fenced saves racing a takeover: every save that succeeded was already stored when the takeover returned."""
    old = Fence("m", (await lease_storage.acquire_lease("m", "a", 10)).epoch)
    other = second_handle(lease_storage)
    try:
        async def write(i: int) -> bool:
            await asyncio.sleep(0.001 * (i % 20))
            try:
                await lease_storage.save(f"k{i}", b"x", expected_version=None, fence=old)
            except LeaseLost:
                return False
            return True

        writers = [asyncio.ensure_future(write(i)) for i in range(60)]
        await asyncio.sleep(0.01)
        await other.acquire_lease("m", "b", 10, takeover=True)
        # What the new holder sees right after taking over: all that may ever be written under `old`.
        seen = {i for i in range(60) if await other.load(f"k{i}") is not None}
        won = {i for i, ok in enumerate(await asyncio.gather(*writers)) if ok}
    finally:
        await other.aclose()
    assert won <= seen, f"written after the takeover: {sorted(won - seen)}"
    assert {i for i in range(60) if await lease_storage.load(f"k{i}") is not None} == won
    with pytest.raises(LeaseLost):
        await lease_storage.save("late", b"x", expected_version=None, fence=old)


async def test_leases_are_not_checkpoints(lease_storage: Any) -> None:
    """Lease records never show in iter_keys, due_keys or stale_keys."""
    await lease_storage.acquire_lease("m", "a", 10)
    await lease_storage.save("k", b"x", expected_version=None, due=1.0)
    assert [s.key async for s in lease_storage.iter_keys()] == ["k"]
    assert await lease_storage.due_keys("", 1e12) == [("k", 1.0)]
    assert [s.key for s in await lease_storage.stale_keys("", time.time() + 60)] == ["k"]


async def test_bad_lease_arguments(lease_storage: Any) -> None:
    """A ttl <= 0, an empty holder or a fence that is not a Fence fail with a clear error."""
    with pytest.raises(ValueError, match="ttl"):
        await lease_storage.acquire_lease("m", "a", 0)
    with pytest.raises(TypeError, match="holder"):
        await lease_storage.acquire_lease("m", "", 10)
    with pytest.raises(TypeError, match="Fence"):
        await lease_storage.save("k", b"x", expected_version=None, fence=("m", 1))


async def test_memory_storage_refuses_fences() -> None:
    """MemoryStorage keeps no leases: a fenced write is a ValueError that names the shared backends."""
    storage = keyhive.MemoryStorage()
    assert not isinstance(storage, LeaseStorage)
    with pytest.raises(ValueError, match="SQLite"):
        await storage.save("k", b"x", expected_version=None, fence=Fence("m", 1))
    assert await storage.load("k") is None

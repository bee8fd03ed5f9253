"""Stored checkpoints seen from a manager (SPEC §13): stored_keys, exists, the checkpoint_ttl sweeper.

Backend tests run on real time against every backend (the storage fixtures); the stored
``updated_at`` is wall time, so "old" is made by moving the sweeper's wall clock
(``keyhive._bounds._wall``) instead of waiting. The sweeper's schedule runs on virtual time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import keyhive
from keyhive import _bounds
from keyhive._keys import storage_key

from ..agents import Counter

TTL = 3600.0


def _age(monkeypatch: pytest.MonkeyPatch, cutoff: float, ttl: float = TTL) -> None:
    """Make the sweeper see every checkpoint written before ``cutoff`` (wall time) as expired."""
    monkeypatch.setattr(_bounds, "_wall", lambda: cutoff + ttl)


async def _stored(m: keyhive.InstanceManager, **kwargs: Any) -> dict[Any, int]:
    return {r.key: r.version async for r in m.stored_keys(**kwargs)}


# -- stored_keys / exists ------------------------------------------------------------------------

async def test_stored_keys_lists_the_default_partition_without_waking(storage: Any, make_manager: Any) -> None:
    """stored_keys() streams the default partition's checkpoints with their fields and wakes nothing."""
    async with make_manager(storage=storage) as m:
        for key in ("a", "b", ("room", 7)):
            await m.call(key, "incr")
            await m.stop(key)
        await m.call("a", "incr")
        await m.stop("a")
        await m.call("x", "incr", partition="p1")
        await m.stop("x", partition="p1")
        before = time.time()
        records = [r async for r in m.stored_keys()]
        assert sorted(map(repr, (r.key for r in records))) == sorted(map(repr, ["a", "b", ("room", 7)]))
        by_key = {r.key: r for r in records}
        assert by_key["a"].version == 2 and by_key["b"].version == 1
        assert all(r.partition is None and r.size > 0 for r in records)
        assert all(r.updated_at is None or r.updated_at <= before + 1 for r in records)
        assert await _stored(m, partition="p1") == {"x": 1}
        assert (await m.stats()).total == 0  # nothing was woken


async def test_exists_checks_storage_only(storage: Any, make_manager: Any) -> None:
    """exists() is True for a stored checkpoint, False for none or a live agent never written."""
    async with make_manager(storage=storage) as m:
        await m.call("saved", "incr")
        await m.stop("saved")
        await m.get("live-only")
        assert await m.exists("saved")
        assert not await m.exists("live-only")
        assert not await m.exists("never")
        assert not await m.exists("saved", partition="elsewhere")
        assert await m.lookup("saved") is None  # not woken
        with pytest.raises(TypeError):
            await m.exists(1.5)


async def test_the_managers_own_partition_is_the_default(storage: Any, make_manager: Any) -> None:
    """With partition= set on the manager, stored_keys() and exists() default to it, as get does."""
    async with make_manager(storage=storage, name="tenant", partition="t1") as m:
        await m.call("a", "incr")
        await m.stop("a")
        assert await _stored(m) == {"a": 1}
        assert await m.exists("a")
    async with make_manager(storage=storage, name="tenant") as plain:
        assert await _stored(plain) == {}
        assert await _stored(plain, partition="t1") == {"a": 1}
        assert not await plain.exists("a")


async def test_no_storage_lists_nothing(make_manager: Any) -> None:
    """With storage=None nothing is stored: stored_keys() is empty and exists() False."""
    async with make_manager(storage=None) as m:
        await m.call("a", "incr")
        assert await _stored(m) == {}
        assert not await m.exists("a")


# -- the sweeper on every backend -----------------------------------------------------------------

async def test_sweep_deletes_only_stale_checkpoints_of_dead_keys(
        storage: Any, make_manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep deletes checkpoints older than checkpoint_ttl, keeps fresh ones and live agents' ones."""
    async with make_manager(storage=storage, checkpoint_ttl=TTL) as m, \
            make_manager(storage=storage, name="neighbour") as other:
        for key in ("old1", "old2", "live"):
            await m.call(key, "incr")
            await m.stop(key)
        await m.call("old3", "incr", partition="p")
        await m.stop("old3", partition="p")
        await other.call("old1", "incr")
        await other.stop("old1")
        await asyncio.sleep(0.05)
        cutoff = time.time()
        await asyncio.sleep(0.05)
        await m.call("fresh", "incr")
        await m.stop("fresh")
        live = await m.get("live")  # thawed: live now, its checkpoint is old
        _age(monkeypatch, cutoff)
        sweeper = m._core.sweeper
        assert sweeper is not None
        assert await sweeper.sweep() == 3
        assert await _stored(m) == {"live": 1, "fresh": 1}
        assert await _stored(m, partition="p") == {}
        assert await _stored(other) == {"old1": 1}  # another manager's checkpoints are never touched
        assert await live.call("incr") == 2
        await m.stop("live")  # its checkpoint is still there to write on top of
        assert await _stored(m) == {"live": 2, "fresh": 1}


async def test_sweep_never_deletes_a_rewritten_checkpoint(
        storage: Any, make_manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written again after the sweeper read it is not deleted (delete_if's version)."""
    async with make_manager(storage=storage, checkpoint_ttl=TTL) as m:
        await m.call("k", "incr")
        await m.stop("k")
        _age(monkeypatch, time.time() + 1)
        sweeper = m._core.sweeper
        assert sweeper is not None

        class Rewriting:
            """The same storage, with another writer landing between stale_keys and delete_if."""

            def __getattr__(self, name: str) -> Any:
                return getattr(storage, name)

            async def stale_keys(self, prefix: str, older_than: float, limit: int = 1000) -> Any:
                found = await storage.stale_keys(prefix, older_than, limit=limit)
                for item in found:
                    checkpoint = await storage.load(item.key)
                    await storage.save(item.key, checkpoint.data, expected_version=checkpoint.version)
                return found

        monkeypatch.setattr(m._core.io, "storage", Rewriting())
        assert await sweeper.sweep() == 0
        assert await _stored(m) == {"k": 2}


async def test_sweep_pages_past_many_live_keys(
        storage: Any, make_manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale checkpoints of live agents filling a whole page do not hide the dead ones behind them."""
    monkeypatch.setattr(_bounds, "_SWEEP_BATCH", 4)
    async with make_manager(storage=storage, checkpoint_ttl=TTL) as m:
        keys = [f"k{i:02}" for i in range(12)]
        for key in keys:
            await m.call(key, "incr")
            await m.stop(key)
        for key in keys[:6]:  # the oldest six are live again
            await m.get(key)
        _age(monkeypatch, time.time() + 1)
        sweeper = m._core.sweeper
        assert sweeper is not None
        assert await sweeper.sweep() == 6
        assert sorted(await _stored(m)) == keys[:6]


async def test_sweep_under_a_lost_lease_deletes_nothing(
        lease_storage: Any, make_manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweeper whose lease was taken over by another holder deletes nothing (the fence refuses)."""
    async with make_manager(storage=lease_storage, checkpoint_ttl=TTL, name="fenced") as m:
        await m.call("k", "incr")
        await m.stop("k")
        await lease_storage.acquire_lease("fenced/*", "another-host:1:x", 10.0, takeover=True)
        _age(monkeypatch, time.time() + 1)
        sweeper = m._core.sweeper
        assert sweeper is not None
        with pytest.raises(keyhive.LeaseLost):
            await sweeper.sweep()
        assert await lease_storage.load(storage_key(m.name, None, "k")) is not None


# -- the sweeper's schedule and the activation race (virtual time, memory) -------------------------

@pytest.mark.looptime
async def test_the_sweeper_runs_every_tenth_of_the_ttl(make_manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With checkpoint_ttl=100 the sweeper runs every 10 s; with a day, every 60 s."""
    assert _bounds.sweep_interval(100.0) == 10.0
    assert _bounds.sweep_interval(86400.0) == 60.0
    loop = asyncio.get_running_loop()
    async with make_manager(checkpoint_ttl=100.0) as m:
        await m.call("k", "incr")
        await m.stop("k")
        _age(monkeypatch, time.time() + 1, ttl=100.0)
        start = loop.time()
        while await m.exists("k"):
            await asyncio.sleep(0.5)
        assert 10.0 <= loop.time() - start <= 11.0
        sweeper = m._core.sweeper
        assert sweeper is not None and sweeper.deleted == 1
    assert sweeper.task is None  # close stopped it


class _SlowDeletes(keyhive.MemoryStorage):
    """Memory storage whose delete_if waits for a gate (to race an activation against it)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.deleting = asyncio.Event()

    async def delete_if(self, key: str, version: int, *, fence: Any = None) -> bool:
        self.deleting.set()
        await self.gate.wait()
        return await super().delete_if(key, version, fence=fence)


@pytest.mark.looptime
async def test_an_activation_waits_for_a_delete_in_flight(
        make_manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A get of a key whose checkpoint is being deleted waits, then starts fresh and saves without conflict."""
    storage = _SlowDeletes()
    async with make_manager(storage=storage, checkpoint_ttl=TTL) as m:
        await m.call("k", "incr")
        await m.stop("k")
        _age(monkeypatch, time.time() + 1)
        sweeper = m._core.sweeper
        assert sweeper is not None
        sweep = asyncio.create_task(sweeper.sweep())
        await storage.deleting.wait()
        get = asyncio.create_task(m.get("k"))
        await asyncio.sleep(1)
        assert not get.done()  # it waits for the delete instead of thawing what is vanishing
        storage.gate.set()
        assert await sweep == 1
        ref = await get
        assert await ref.call("get") == 0  # started fresh: the checkpoint had expired
        await ref.call("incr")
        await m.stop("k")
        stored = await storage.load(storage_key(m.name, None, "k"))
        assert stored is not None and stored.version == 1  # a new checkpoint, no conflict


# -- configuration --------------------------------------------------------------------------------

def test_checkpoint_ttl_needs_a_storage() -> None:
    """checkpoint_ttl with storage=None is a ValueError that says what to write."""
    with pytest.raises(ValueError, match="checkpoint_ttl needs a storage"):
        keyhive.InstanceManager("ttl", Counter, storage=None, checkpoint_ttl=60)


def test_checkpoint_ttl_needs_retention_methods() -> None:
    """checkpoint_ttl on a backend without stale_keys/delete_if is a TypeError naming them."""

    class Plain:
        async def load(self, key: str) -> Any: ...
        async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int: ...
        async def delete(self, key: str) -> bool: ...
        async def aclose(self) -> None: ...

    with pytest.raises(TypeError, match="stale_keys and delete_if"):
        keyhive.InstanceManager("ttl", Counter, storage=Plain(), checkpoint_ttl=60)

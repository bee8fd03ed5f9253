"""When a live agent's state is written (SPEC §9), on MemoryStorage and on SQLite.

``checkpoint="turn"``: a call returns only once its state is durable, turns that end
together are written as one batch, and a failed write reaches the caller while the state
stays in memory for the next write. A number: write-behind, batched, only changed agents.
``await self.checkpoint()``: writes now whatever the policy; a failure raises in the handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import keyhive
from keyhive._keys import storage_key
from keyhive.codecs import unpack
from keyhive.storage.sqlite import SQLiteStorage
from keyhive.testing import FaultyStorage

pytestmark = pytest.mark.looptime


@pytest.fixture(params=["memory", "sqlite"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FaultyStorage]:
    """A FaultyStorage (it counts batches and injects faults) around a real backend."""
    inner = keyhive.MemoryStorage() if request.param == "memory" else SQLiteStorage(tmp_path / "c.db")
    wrapped = FaultyStorage(inner)
    try:
        yield wrapped
    finally:
        await inner.aclose()


class Count(keyhive.Agent):
    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"n": 0}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["n"] += 1
        elif message == "incr-and-checkpoint":
            self.state["n"] += 1
            await self.checkpoint()
        elif message == "checkpoint":
            await self.checkpoint()
        return self.state["n"]


async def stored(storage: FaultyStorage, m: keyhive.InstanceManager, key: str) -> tuple[int, int] | None:
    """``(n, version)`` as the inner backend holds them right now, or None."""
    cp = await storage.inner.load(storage_key(m.name, None, key))
    if cp is None:
        return None
    return orjson.loads(unpack(cp.data).payload)["n"], cp.version


# -- checkpoint="turn" -----------------------------------------------------------------------------


async def test_turn_policy_returns_only_once_the_state_is_durable(make_manager: Any,
                                                                  storage: FaultyStorage) -> None:
    """Under checkpoint='turn' the backend holds a call's state the moment the call returns,
    even when the write is slow."""
    async with make_manager(Count, storage=storage, checkpoint="turn") as m:
        loop = asyncio.get_running_loop()
        for n in range(1, 4):
            storage.save_delay = 0.5 * n
            began = loop.time()
            assert await m.call("k", "incr") == n
            assert loop.time() - began >= 0.5 * n  # it waited for the write
            assert await stored(storage, m, "k") == (n, n)


async def test_turn_policy_group_commits_concurrent_turns(make_manager: Any,
                                                          storage: FaultyStorage) -> None:
    """200 concurrent callers over 200 keys are written in a few save_many batches, not one per
    turn, and every one of them is durable when its call returns."""
    async with make_manager(Count, storage=storage, checkpoint="turn") as m:
        keys = [f"k{i}" for i in range(200)]
        for key in keys:
            await m.get(key)
        assert storage.saves == 0  # fresh agents: nothing to write yet
        storage.save_delay = 0.01
        assert await asyncio.gather(*(m.call(key, "incr") for key in keys)) == [1] * 200
        assert storage.saves == 200
        assert storage.save_batches <= 4, storage.save_batches
        for key in keys:
            assert await stored(storage, m, key) == (1, 1)


async def test_turn_policy_failed_write_reaches_the_caller_and_the_next_write_carries_it(
        make_manager: Any, storage: FaultyStorage) -> None:
    """A failed durable write raises StorageError in the caller; the state stays in memory and
    the next successful write (here a read-only turn's) stores it."""
    async with make_manager(Count, storage=storage, checkpoint="turn") as m:
        assert await m.call("k", "incr") == 1
        storage.fail_save = 1
        with pytest.raises(keyhive.StorageError):
            await m.call("k", "incr")
        ref = await m.lookup("k")
        assert ref is not None and (await ref.state())["n"] == 2  # kept in memory
        assert await stored(storage, m, "k") == (1, 1)
        assert await m.call("k", "get") == 2  # nothing changed in this turn, but 2 was never written
        assert await stored(storage, m, "k") == (2, 2)
        assert await m.call("k", "get") == 2
        assert storage.saves == 2  # n=1 and n=2; the failed write never reached the backend, the last turn wrote nothing


# -- write-behind --------------------------------------------------------------------------------


async def test_write_behind_writes_changed_agents_within_its_interval_in_batches(
        make_manager: Any, storage: FaultyStorage) -> None:
    """checkpoint=2.0 writes each changed agent within 2 s of its turn, batched, and never writes
    an agent that did not change."""
    async with make_manager(Count, storage=storage, checkpoint=2.0) as m:
        keys = [f"k{i}" for i in range(50)]
        for key in keys:
            await m.get(key)
        changed = keys[:30]
        for key in changed:
            assert await m.call(key, "incr") == 1
        assert storage.saves == 0  # not yet: behind
        await asyncio.sleep(2.05)
        for key in changed:
            assert await stored(storage, m, key) == (1, 1)
        for key in keys[30:]:
            assert await stored(storage, m, key) is None
        assert storage.saves == 30
        assert storage.save_batches <= 2, storage.save_batches
        for key in changed[:5]:
            await m.call(key, "get")  # read-only turns
        await asyncio.sleep(10)
        assert storage.saves == 30  # nothing changed since: nothing written
        await m.call("k0", "incr")
        await asyncio.sleep(2.05)
        assert await stored(storage, m, "k0") == (2, 2)
        assert storage.saves == 31


# -- self.checkpoint() ---------------------------------------------------------------------------


async def test_self_checkpoint_writes_now_under_idle_and_a_failure_raises_in_the_handler(
        make_manager: Any, storage: FaultyStorage) -> None:
    """Under checkpoint='idle', await self.checkpoint() writes the state at once (nothing when
    unchanged); a failed write raises in the handler and the state stays in memory."""
    async with make_manager(Count, storage=storage) as m:
        await m.call("k", "incr")
        assert await stored(storage, m, "k") is None  # idle policy: not written by a turn
        assert await m.call("k", "incr-and-checkpoint") == 2
        assert await stored(storage, m, "k") == (2, 1)
        await m.call("k", "checkpoint")
        assert storage.saves == 1  # unchanged: nothing written

        storage.fail_save = 1
        with pytest.raises(keyhive.StorageError):
            await m.call("k", "incr-and-checkpoint")  # raised in the handler, reaches the caller
        ref = await m.lookup("k")
        assert ref is not None and (await ref.state())["n"] == 3
        assert await stored(storage, m, "k") == (2, 1)
        await m.call("k", "checkpoint")
        assert await stored(storage, m, "k") == (3, 2)

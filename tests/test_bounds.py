"""max_live (SPEC §13): LRU eviction of unattached agents, the over-cap warning, backpressure."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import keyhive
from keyhive import StopReason
from keyhive.testing import EventRecorder, FaultyStorage

from .agents import Counter

pytestmark = pytest.mark.looptime


async def _settle(m: keyhive.InstanceManager) -> None:
    """Let queued eviction batches land (they run in manager tasks)."""
    for _ in range(20):
        await asyncio.sleep(0)
    evictor = m._core.evictor
    assert evictor is not None
    while evictor.leaving:
        await asyncio.sleep(0.01)


async def test_activation_over_the_cap_evicts_the_least_recently_used(make_manager: Any) -> None:
    """With max_live=3, a new key evicts the agent used longest ago (EVICTED, saved, counted)."""
    async with make_manager(max_live=3) as m:
        with EventRecorder(m) as events:
            for key in ("a", "b", "c"):
                await m.call(key, "incr")
            await m.get("d")  # a is the least recently used
            await _settle(m)
            await m.get("b")  # a get is a use
            await m.call("c", "incr")  # and so is a call: d is the least recently used now
            await m.get("e")
            await _settle(m)
            assert sorted((await m.stats()).keys) == ["b", "c", "e"]
            assert [(e.key, e.reason) for e in events.of("stopped")] == [
                ("a", StopReason.EVICTED), ("d", StopReason.EVICTED)]
            assert events.count("hibernated", "a") == 1
        stats = await m.stats()
        assert stats.counters["evicted"] == 2
        assert not stats.over_cap
        assert await m.call("a", "get") == 1  # thawed: the evicted state was saved


async def test_a_held_refs_calls_keep_it_live(make_manager: Any) -> None:
    """Calls through a held ref count as uses: the agent called between activations stays live."""
    async with make_manager(max_live=2) as m:
        hot = await m.get("hot")
        for i in range(20):
            await hot.call("incr")
            await m.get(f"cold{i}")
            await _settle(m)
        assert hot.alive
        assert await hot.call("get") == 20


async def test_the_live_count_never_exceeds_the_cap_in_a_burst(make_manager: Any) -> None:
    """A burst of misses that never yields keeps at most max_live agents live once batches land."""
    cap = 50
    async with make_manager(max_live=cap, hibernate_batch=8) as m:
        peak = 0

        def count(event: keyhive.Event) -> None:
            nonlocal peak
            peak = max(peak, len(m._core.default_reg))

        m.subscribe(count)
        for i in range(500):
            await m.call(f"k{i}", "incr")
        # backpressure: at most the in-flight batches (4 of 1 here: 1% of 50) above the cap
        assert cap < peak <= cap + 5
        await _settle(m)
        stats = await m.stats()
        assert stats.total <= cap
        assert stats.counters["evicted"] == 500 - stats.total
        assert stats.counters["hibernated"] == stats.counters["evicted"]
        for i in range(500):  # every evicted state comes back
            assert await m.call(f"k{i}", "get") == 1


async def test_a_burst_makes_batched_writes(make_manager: Any) -> None:
    """Evictions of a burst go to storage in batches (save_many), not one write per agent."""
    storage = FaultyStorage(keyhive.MemoryStorage())
    async with make_manager(max_live=200, storage=storage) as m:
        for i in range(1000):
            await m.call(f"k{i}", "incr")
        await _settle(m)
        evicted = (await m.stats()).counters["evicted"]
        assert evicted >= 800
        assert storage.saves == evicted
        assert storage.save_batches * 2 <= evicted  # at least two per batch on average


async def test_attached_agents_are_never_evicted(make_manager: Any) -> None:
    """Attached agents stay live even when they are the least recently used."""
    async with make_manager(max_live=2) as m, m.attach("a"):
        await m.call("b", "incr")
        await m.get("c")
        await _settle(m)
        assert sorted((await m.stats()).keys) == ["a", "c"]
        assert (await m.lookup("a")) is not None


async def test_everything_attached_exceeds_the_cap_with_one_warning(
        make_manager: Any, caplog: pytest.LogCaptureFixture) -> None:
    """When every live agent is attached, get succeeds over the cap, warns once, and stats say so."""
    caplog.set_level(logging.WARNING, logger="keyhive")
    async with make_manager(max_live=2) as m:
        refs = [await m.get(k) for k in ("a", "b")]
        for ref in refs:
            await ref.attach("test")
        for key in ("c", "d", "e"):
            await m.get(key)  # c, d, e are unattached: each new one finds an older unattached one
            await m.get(key)
        await _settle(m)
        warnings = [r for r in caplog.records if "over max_live" in r.getMessage()]
        assert len(warnings) == 1
        stats = await m.stats()
        assert stats.total == 3 and stats.over_cap  # a, b attached and the newest one
        for ref in refs:
            await ref.detach("test")
        await m.get("f")  # back under the cap after this eviction round
        await _settle(m)
        stats = await m.stats()
        assert stats.total <= 2 and not stats.over_cap
        caplog.clear()
        for ref in [await m.get(k) for k in ("f", "g")]:
            await ref.attach("again")
        await m.get("h")  # a new crossing: a new warning
        assert len([r for r in caplog.records if "over max_live" in r.getMessage()]) == 1


async def test_a_busy_agent_is_not_evicted(make_manager: Any) -> None:
    """An agent in the middle of a turn is skipped by eviction; its turn finishes untouched."""
    async with make_manager(max_live=1) as m:
        ref = await m.get("slow")
        call = asyncio.create_task(ref.call(("sleep", 10.0), timeout=None))
        await asyncio.sleep(1)
        await m.get("other")
        await _settle(m)
        assert ref.alive
        assert await call == 1
        assert (await m.stats()).over_cap


async def test_a_failed_eviction_keeps_the_agent(make_manager: Any) -> None:
    """When the eviction's write fails the agent keeps running with its state; nothing is lost."""
    storage = FaultyStorage(keyhive.MemoryStorage())
    async with make_manager(max_live=1, storage=storage) as m:
        await m.call("a", "incr")
        storage.fail_save = True
        await m.get("b")
        await _settle(m)
        ref = await m.lookup("a")
        assert ref is not None and ref.alive
        assert await ref.call("get") == 1
        assert (await m.stats()).counters["hibernate_failures"] >= 1
        storage.heal()
    assert await m.exists("a")  # saved by close once storage healed


async def test_partitions_share_one_cap(make_manager: Any) -> None:
    """max_live counts the agents of every partition together."""
    async with make_manager(max_live=2) as m:
        await m.call("a", "incr", partition="p1")
        await m.call("a", "incr", partition="p2")
        await m.call("b", "incr")
        await _settle(m)
        stats = await m.stats()
        assert stats.total == 2
        assert stats.counters["evicted"] == 1


async def test_max_live_none_never_evicts(make_manager: Any) -> None:
    """Without max_live nothing is ever evicted, however many agents are live."""
    async with make_manager() as m:
        for i in range(300):
            await m.get(f"k{i}")
        stats = await m.stats()
        assert stats.total == 300 and stats.counters["evicted"] == 0 and not stats.over_cap
        assert m._core.evictor is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True])
def test_bad_max_live(bad: Any) -> None:
    """max_live must be a positive int or None; the message says so."""
    with pytest.raises(ValueError, match="max_live must be a positive int or None"):
        keyhive.InstanceManager("bad", Counter, max_live=bad, storage=None)

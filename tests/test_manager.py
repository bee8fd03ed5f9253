"""InstanceManager: Jido's InstanceManager scenarios, on asyncio (SPEC §2, §5)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

import keyhive
from keyhive.testing import EventRecorder, FaultyStorage

from .agents import Counter


async def test_get_starts_an_agent_and_returns_the_same_ref(manager: keyhive.InstanceManager) -> None:
    """get starts an agent on first use and returns an equal ref for a live key."""
    ref = await manager.get("user-1")
    again = await manager.get("user-1")
    assert ref == again
    assert hash(ref) == hash(again)
    assert ref.alive
    assert (ref.key, ref.partition, ref.manager) == ("user-1", None, manager.name)
    assert await ref.call("incr") == 1


async def test_different_keys_get_different_agents(manager: keyhive.InstanceManager) -> None:
    """Each key has its own agent and state."""
    a = await manager.get("a")
    b = await manager.get("b")
    assert a != b
    await a.call("incr")
    assert await b.call("get") == 0


async def test_lookup_never_starts(manager: keyhive.InstanceManager) -> None:
    """lookup returns None for a key without a live agent and the ref once one exists."""
    assert await manager.lookup("x") is None
    assert (await manager.stats()).count == 0
    ref = await manager.get("x")
    assert await manager.lookup("x") == ref


async def test_initial_state_for_fresh_agents(manager: keyhive.InstanceManager) -> None:
    """initial_state reaches Agent.initial_state for a fresh agent and is ignored for a live one."""
    ref = await manager.get("k", initial_state={"count": 41, "name": "n"})
    assert await ref.state() == {"count": 41, "name": "n"}
    await manager.get("k", initial_state={"count": 0})
    assert await ref.call("incr") == 42


async def test_initial_state_ignored_when_a_checkpoint_exists(make_manager: Any) -> None:
    """With a checkpoint stored, get thaws it and ignores initial_state."""
    storage = keyhive.MemoryStorage()
    async with make_manager(storage=storage, name="thaw-ignores") as m:
        await m.call("k", "incr")
        await m.stop("k")
        ref = await m.get("k", initial_state={"count": 100})
        assert await ref.call("get") == 1


async def test_default_initial_state_is_empty(make_manager: Any) -> None:
    """Without initial_state the default Agent.initial_state gives an empty dict."""

    class Plain(keyhive.Agent):
        async def handle(self, message: Any) -> Any:
            return self.state

    async with make_manager(Plain) as m:
        assert await m.call("k", "x") == {}


async def test_agent_sees_its_identity_and_opts(make_manager: Any) -> None:
    """key, partition, manager and opts are set before any hook runs."""
    seen: list[tuple[Any, ...]] = []

    class Introspect(keyhive.Agent):
        def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
            seen.append(("init", self.key, self.partition, self.manager, dict(self.opts)))
            return {}

        async def on_start(self, thawed: bool) -> None:
            seen.append(("start", self.key, thawed))

        async def handle(self, message: Any) -> Any:
            return None

    async with make_manager(Introspect, name="intro", agent_opts={"model": "m1"}) as m:
        await m.get("k", partition="p")
        assert seen == [("init", "k", "p", "intro", {"model": "m1"}), ("start", "k", False)]
        assert m.agent is Introspect
        with pytest.raises(TypeError):
            m.agent_opts["x"] = 1  # type: ignore[index]


async def test_partitions_are_separate_agents(manager: keyhive.InstanceManager) -> None:
    """The same key in two partitions is two agents; no partition sees neither."""
    a = await manager.get("k", partition="a")
    b = await manager.get("k", partition="b")
    assert a != b
    await a.call("incr")
    assert await b.call("get") == 0
    assert await manager.lookup("k") is None
    assert await manager.lookup("k", partition="a") == a
    assert (await manager.stats(partition="a")).keys == ["k"]
    assert (await manager.stats()).count == 0
    assert (await manager.stats()).total == 2


async def test_manager_default_partition(make_manager: Any) -> None:
    """A manager's partition= is the default for every call."""
    async with make_manager(partition="tenant-1") as m:
        ref = await m.get("k")
        assert ref.partition == "tenant-1"
        assert await m.lookup("k", partition="tenant-1") == ref
        assert (await m.stats()).keys == ["k"]


async def test_stop_writes_the_checkpoint_and_raises_not_found_after(make_manager: Any) -> None:
    """stop returns after on_stop ran and the checkpoint is written; a second stop is NotFound."""
    storage = FaultyStorage()
    async with make_manager(storage=storage) as m:
        ref = await m.get("k")
        await ref.call("incr")
        await m.stop("k")
        assert not ref.alive
        assert ref.stop_reason is keyhive.StopReason.STOPPED
        assert storage.saves == 1
        with pytest.raises(keyhive.NotFound):
            await m.stop("k")
        with pytest.raises(LookupError):
            await m.stop("never")
        assert await m.lookup("k") is None
        again = await m.get("k")
        assert again != ref
        assert await again.call("get") == 1


async def test_stop_while_attached(manager: keyhive.InstanceManager) -> None:
    """stop stops an agent even while something is attached."""
    ref = await manager.get("k")
    await ref.attach()
    await manager.stop("k")
    assert ref.stop_reason is keyhive.StopReason.STOPPED


async def test_stats_count_and_keys(manager: keyhive.InstanceManager) -> None:
    """stats reports live agents of the partition and the manager's totals."""
    for key in ["a", "b", "c"]:
        await manager.get(key)
    ref = await manager.get("d")
    await ref.attach()
    stats = (await manager.stats())
    assert stats.count == 4
    assert sorted(stats.keys) == ["a", "b", "c", "d"]
    assert stats.attached == 1
    assert stats.running
    assert stats.counters["started"] == 4
    await manager.stop("a")
    assert (await manager.stats()).count == 3


async def test_tuple_uuid_int_bytes_keys(manager: keyhive.InstanceManager) -> None:
    """Tuple, UUID, int and bytes keys each address their own agent."""
    keys = [("room", 1), uuid.uuid4(), 7, b"\x00k", ("a", ("b", b"c"))]
    refs = [await manager.get(k) for k in keys]
    assert len(set(refs)) == len(keys)
    for key, ref in zip(keys, refs, strict=True):
        assert await manager.get(key) == ref
        assert ref.key == key


@pytest.mark.parametrize("key", [1.5, None, True, ["a"], {"a": 1}, object()])
async def test_bad_key_types(manager: keyhive.InstanceManager, key: Any) -> None:
    """A key of an unsupported type raises TypeError naming the type, everywhere."""
    with pytest.raises(TypeError, match=type(key).__name__):
        await manager.get(key)
    with pytest.raises(TypeError):
        await manager.lookup(key)
    with pytest.raises(TypeError):
        await manager.stop(key)
    assert (await manager.stats()).total == 0


async def test_oversized_key(manager: keyhive.InstanceManager) -> None:
    """A key encoding to more than 1024 bytes raises ValueError."""
    with pytest.raises(ValueError, match="1024"):
        await manager.get("x" * 2000)


async def test_storage_none_starts_fresh(make_manager: Any) -> None:
    """With storage=None nothing is written and every start is fresh."""
    async with make_manager(storage=None) as m:
        assert m.storage is None
        await m.call("k", "incr")
        await m.stop("k")
        assert await m.call("k", "get") == 0


async def test_default_storage_is_process_wide_memory() -> None:
    """Omitting storage uses the process-wide memory storage: state survives a new manager."""

    m1 = keyhive.InstanceManager("default-storage", Counter)
    assert m1.storage is keyhive.storage.default_storage()
    async with m1:
        await m1.call("k", "incr")
    m2 = keyhive.InstanceManager("default-storage", Counter)
    async with m2:
        assert await m2.call("k", "get") == 1
        await m2.stop("k")
    await keyhive.storage.default_storage().delete(
        keyhive._keys.storage_key("default-storage", None, "k")
    )


async def test_two_managers_share_storage_without_collisions(make_manager: Any) -> None:
    """Managers sharing one storage never see each other's checkpoints."""
    storage = keyhive.MemoryStorage()
    async with make_manager(storage=storage, name="m-a") as a, make_manager(storage=storage, name="m-b") as b:
        await a.call("k", "incr")
        await a.call("k", "incr")
        await b.call("k", "incr")
        await a.stop("k")
        await b.stop("k")
        assert await a.call("k", "get") == 2
        assert await b.call("k", "get") == 1
    assert len([k async for k in storage.iter_keys()]) == 2


async def test_partitioned_checkpoints(make_manager: Any) -> None:
    """Checkpoints are scoped by partition: each partition thaws its own state."""
    async with make_manager() as m:
        await m.call("k", "incr", partition="a")
        await m.stop("k", partition="a")
        await m.stop("k", partition="b") if await m.lookup("k", partition="b") else None
        assert await m.call("k", "get", partition="b") == 0
        assert await m.call("k", "get", partition="a") == 1


async def test_manager_call_regets_once_after_a_stop(manager: keyhive.InstanceManager) -> None:
    """manager.call gets the key again when the agent stopped between get and call."""
    await manager.call("k", "incr")
    ref = await manager.get("k")
    await manager.stop("k")
    assert not ref.alive
    assert await manager.call("k", "incr") == 2


async def test_manager_attach_context(manager: keyhive.InstanceManager) -> None:
    """manager.attach attaches a fresh owner for the block and detaches on exit, also on error."""
    async with manager.attach("k") as ref:
        assert ref.attachments == 1
        async with manager.attach("k") as same:
            assert same == ref
            assert ref.attachments == 2
    assert ref.attachments == 0
    with pytest.raises(RuntimeError):
        async with manager.attach("k") as ref:
            raise RuntimeError("x")
    assert ref.attachments == 0


# -- configuration and the manager's own lifecycle ---------------------------------------


def test_bad_configuration() -> None:
    """Wrong types raise TypeError, bad values ValueError, in the constructor."""
    M = keyhive.InstanceManager
    with pytest.raises(TypeError):
        M(1, Counter)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        M("", Counter)
    with pytest.raises(TypeError):
        M("x", object)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        M("x", Counter())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="handle"):
        M("x", keyhive.Agent)

    class SyncHandle(keyhive.Agent):
        def handle(self, message: Any) -> Any:  # type: ignore[override]
            return 1

    with pytest.raises(TypeError, match="async def"):
        M("x", SyncHandle)
    for bad in [0, -1, 1.5, "2", True]:
        with pytest.raises(ValueError, match="registry_partitions"):
            M("x", Counter, registry_partitions=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        M("x", Counter, idle_timeout="10")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown storage URL scheme"):
        M("x", Counter, storage="ftp://x")
    with pytest.raises(ValueError, match="memory"):
        M("x", Counter, storage="memory://somewhere")
    with pytest.raises(TypeError, match="storage"):
        M("x", Counter, storage=42)
    with pytest.raises(TypeError):
        M("x", Counter, agent_opts=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        M("x", Counter, partition=1.5)
    with pytest.raises(ValueError):
        M("x", Counter, max_state_bytes=0)


def test_idle_timeout_forms() -> None:
    """idle_timeout takes seconds or a timedelta; None, 0 or negative mean never."""
    M = keyhive.InstanceManager
    assert M("x", Counter, idle_timeout=timedelta(minutes=15)).idle_timeout == 900.0
    assert M("x", Counter, idle_timeout=2).idle_timeout == 2.0
    for never in [None, 0, -5]:
        assert M("x", Counter, idle_timeout=never).idle_timeout is None


async def test_registry_partitions_default_and_reported() -> None:
    """registry_partitions defaults to the CPU count and is reported in stats."""
    import os

    m = keyhive.InstanceManager("x", Counter, registry_partitions=8)
    assert (await m.stats()).registry_partitions == 8
    assert keyhive.InstanceManager("x", Counter).registry_partitions == (os.cpu_count() or 1)


async def test_not_running_manager_raises_manager_closed() -> None:
    """Every call on a manager before start or after close raises ManagerClosed."""
    m = keyhive.InstanceManager("closed-one", Counter, storage=None)
    with pytest.raises(keyhive.ManagerClosed):
        await m.get("k")
    with pytest.raises(keyhive.ManagerClosed):
        await m.lookup("k")
    async with m:
        ref = await m.get("k")
    for call in (m.get("k"), m.lookup("k"), m.stop("k"), m.call("k", "incr")):
        with pytest.raises(keyhive.ManagerClosed):
            await call
    with pytest.raises(keyhive.AgentStopped):
        await ref.call("incr")
    assert ref.stop_reason is keyhive.StopReason.SHUTDOWN


async def test_duplicate_running_names_and_get_manager(make_manager: Any) -> None:
    """Two running managers with one name raise ValueError on start; get_manager finds the running one."""
    first = make_manager(name="dup")
    second = make_manager(name="dup")
    async with first:
        assert keyhive.get_manager("dup") is first
        with pytest.raises(ValueError, match="already running"):
            await second.start()
    with pytest.raises(keyhive.NotFound):
        keyhive.get_manager("dup")
    async with second:
        assert keyhive.get_manager("dup") is second


async def test_manager_restarts_after_close(make_manager: Any) -> None:
    """A closed manager can be started again and thaws what it saved on close."""
    m = make_manager()
    async with m:
        await m.call("k", "incr")
    async with m:
        assert await m.call("k", "incr") == 2


async def test_close_hibernates_every_live_agent(make_manager: Any) -> None:
    """Closing saves and stops every live agent with reason SHUTDOWN, attached or not."""
    storage = FaultyStorage()
    m = make_manager(storage=storage)
    async with m:
        recorder = EventRecorder(m)
        refs = [await m.get(i) for i in range(50)]
        for ref in refs:
            await ref.call("incr")
        await refs[0].attach()
    assert all(r.stop_reason is keyhive.StopReason.SHUTDOWN for r in refs)
    assert storage.saves == 50
    assert storage.save_batches == 1
    assert recorder.kinds(0)[-2:] == ["hibernated", "stopped"]
    async with m:
        assert await m.call(49, "get") == 1


async def test_events_report_the_lifecycle(make_manager: Any) -> None:
    """Subscribers see started, attached, detached, hibernated, stopped and thawed with key and reason."""
    async with make_manager() as m:
        recorder = EventRecorder(m)
        ref = await m.get("k", partition="p")
        await ref.attach("owner")
        await ref.call("incr")  # a changed state: the stop writes it, the next get thaws it
        await ref.detach("owner")
        await m.stop("k", partition="p")
        await m.get("k", partition="p")
        assert recorder.kinds() == ["started", "attached", "detached", "hibernated", "stopped", "thawed"]
        stopped = await recorder.wait_for("stopped", "k")
        assert stopped.reason is keyhive.StopReason.STOPPED
        assert stopped.partition == "p"
        assert stopped.manager == m.name
        recorder.unsubscribe()
        await m.stop("k", partition="p")
        assert len(recorder.events) == 6


async def test_failing_subscriber_does_not_break_the_manager(manager: keyhive.InstanceManager,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """An exception in an event callback is logged and the manager goes on."""

    def bad(event: keyhive.Event) -> None:
        raise ValueError("subscriber bug")

    manager.subscribe(bad)
    assert await manager.call("k", "incr") == 1
    assert "event callback" in caplog.text

"""Single-flight activation, fail-closed thaw, and never losing or overwriting state (SPEC §2, §4)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import pytest

import keyhive
from keyhive._keys import storage_key
from keyhive.codecs import pack
from keyhive.testing import EventRecorder, FaultyStorage


async def test_single_flight_under_1000_concurrent_cold_gets(make_manager: Any) -> None:
    """1,000 concurrent gets of one hibernated key share one storage load and one start."""
    storage = FaultyStorage()
    starts = 0

    class Slow(keyhive.Agent):
        async def on_start(self, thawed: bool) -> None:
            nonlocal starts
            starts += 1
            await asyncio.sleep(0.01)

        async def handle(self, message: Any) -> Any:
            return None

    async with make_manager(Slow, storage=storage) as m:
        storage.load_delay = 0.01
        refs = await asyncio.gather(*(m.get("k") for _ in range(1000)))
        assert len(set(refs)) == 1
        assert storage.loads == 1
        assert starts == 1


async def test_concurrent_cold_gets_of_a_failing_thaw_share_the_error(make_manager: Any) -> None:
    """Concurrent gets of a key whose thaw fails all get ThawError from one load."""
    storage = FaultyStorage()
    async with make_manager(storage=storage) as m:
        storage.load_delay = 0.01
        storage.fail_load = True
        results = await asyncio.gather(*(m.get("k") for _ in range(50)), return_exceptions=True)
        assert all(isinstance(r, keyhive.ThawError) for r in results)
        assert (await m.stats()).total == 0


async def test_cancelled_get_leaves_no_half_registered_key(make_manager: Any) -> None:
    """A get cancelled during its thaw leaves nothing registered; waiting gets take over; the next get works."""
    storage = FaultyStorage()
    async with make_manager(storage=storage) as m:
        storage.load_delay = 1.0
        first = asyncio.create_task(m.get("k"))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(m.get("k"))
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        storage.load_delay = 0
        ref = await second
        assert ref.alive
        assert (await m.stats()).keys == ["k"]
        assert await m.get("k") == ref

        storage.load_delay = 1.0
        lone = asyncio.create_task(m.get("other"))
        await asyncio.sleep(0.01)
        lone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lone
        assert await m.lookup("other") is None
        assert (await m.stats()).keys == ["k"]


async def _store(storage: keyhive.MemoryStorage, manager: str, key: Any, data: bytes) -> int:
    return await storage.save(storage_key(manager, None, key), data, expected_version=None)


@pytest.mark.parametrize(
    "data",
    [b"garbage", b"", pack(1, b"{not json"), pack(1, b'{"count": 1}')[:-3], b"\x80\x04pickle"],
)
async def test_corrupt_checkpoint_fails_closed(make_manager: Any, data: bytes) -> None:
    """A checkpoint that cannot be decoded raises ThawError; nothing starts; the bytes stay as they were."""
    storage = keyhive.MemoryStorage()
    async with make_manager(storage=storage, name="fc") as m:
        events = EventRecorder(m)
        version = await _store(storage, "fc", "k", data)
        with pytest.raises(keyhive.ThawError) as info:
            await m.get("k")
        assert info.value.__cause__ is not None
        assert (await m.stats()).total == 0
        assert await m.lookup("k") is None
        stored = await storage.load(storage_key("fc", None, "k"))
        assert stored == keyhive.Checkpoint(data, version)
        assert events.kinds() == ["thaw_failed"]
        with pytest.raises(keyhive.ThawError):
            await m.call("k", "incr")
        assert (await storage.load(storage_key("fc", None, "k"))) == keyhive.Checkpoint(data, version)


async def test_unreachable_storage_on_thaw_fails_closed(make_manager: Any) -> None:
    """Storage failing on load raises ThawError with the storage error as cause; nothing starts."""
    storage = FaultyStorage()
    async with make_manager(storage=storage) as m:
        storage.fail_load = 1
        with pytest.raises(keyhive.ThawError) as info:
            await m.get("k")
        assert isinstance(info.value.__cause__, ConnectionError)
        assert (await m.stats()).total == 0
        assert await m.call("k", "incr") == 1  # storage back: fresh start


async def test_failed_stop_write_raises_and_keeps_the_agent(make_manager: Any) -> None:
    """stop whose write fails raises StorageError (cause kept) and the agent stays alive and serving."""
    storage = FaultyStorage()
    async with make_manager(storage=storage) as m:
        ref = await m.get("k")
        await ref.call("incr")
        storage.fail_save = 1
        with pytest.raises(keyhive.StorageError) as info:
            await m.stop("k")
        assert isinstance(info.value.__cause__, ConnectionError)
        assert ref.alive
        assert await ref.call("incr") == 2
        assert await m.lookup("k") == ref
        await m.stop("k")
        assert await m.call("k", "get") == 2


async def test_user_backend_exceptions_become_storage_errors(make_manager: Any) -> None:
    """Whatever a user-written backend raises reaches callers as StorageError with the original as cause."""

    class Broken:
        async def load(self, key: str) -> keyhive.Checkpoint | None:
            return None

        async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
            raise KeyError("driver bug")

        async def delete(self, key: str) -> bool:
            return False

        async def aclose(self) -> None:
            return None

    async with make_manager(storage=Broken(), close_timeout=0.1) as m:
        await m.call("k", "incr")
        with pytest.raises(keyhive.StorageError) as info:
            await m.stop("k")
        assert isinstance(info.value.__cause__, KeyError)
        ref = await m.get("k")
        ref2 = await m.get("k2")
        await ref2.call("incr")
        with pytest.raises(keyhive.UnsavedAgentsError):
            await m.close()
        assert {ref.stop_reason, ref2.stop_reason} == {keyhive.StopReason.UNSAVED}


async def test_conflict_when_another_incarnation_wrote(make_manager: Any) -> None:
    """A stale incarnation's write fails with ConflictError instead of overwriting newer state."""
    storage = keyhive.MemoryStorage()
    async with make_manager(storage=storage, name="cas-a") as a:
        await a.call("k", "incr")
        # Another process writes newer state for the same key meanwhile.
        skey = storage_key("cas-a", None, "k")
        await storage.save(skey, pack(1, b'{"count": 50}'), expected_version=None)
        with pytest.raises(keyhive.ConflictError):
            await a.stop("k")
        ref = await a.lookup("k")
        assert ref is not None
        assert ref.alive
        with pytest.raises(keyhive.UnsavedAgentsError) as info:
            await a.close()  # a conflict is not retried until the deadline
        assert info.value.keys == [(None, "k")]
        assert isinstance(info.value.errors[0], keyhive.ConflictError)
        assert ref.stop_reason is keyhive.StopReason.CONFLICT
        stored = await storage.load(skey)
        assert stored is not None
        assert stored.data == pack(1, b'{"count": 50}')


@pytest.mark.looptime
async def test_idle_conflict_stops_without_overwriting(make_manager: Any) -> None:
    """On idle timeout, a conflicting write stops the stale agent with CONFLICT and keeps the newer state."""
    storage = keyhive.MemoryStorage()
    async with make_manager(storage=storage, name="cas-b", idle_timeout=60) as m:
        ref = await m.get("k")
        await ref.call("incr")
        skey = storage_key("cas-b", None, "k")
        await storage.save(skey, pack(1, b'{"count": 50}'), expected_version=None)
        assert await ref.wait_stopped() is keyhive.StopReason.CONFLICT
        assert await m.call("k", "get") == 50


async def test_stop_after_thaw_uses_the_thawed_version(make_manager: Any) -> None:
    """Successive incarnations write successive versions (compare-and-set chain)."""
    storage = keyhive.MemoryStorage()
    async with make_manager(storage=storage, name="chain") as m:
        for expected in range(1, 4):
            await m.call("k", "incr")
            await m.stop("k")
            stored = await storage.load(storage_key("chain", None, "k"))
            assert stored is not None and stored.version == expected


@dataclasses.dataclass
class Profile:
    name: str = "anon"
    visits: int = 0


class Typed(keyhive.Agent):
    state_type = Profile

    async def handle(self, message: Any) -> Any:
        self.state.visits += 1
        return self.state


async def test_state_type_builds_and_thaws_typed_state(make_manager: Any) -> None:
    """state_type builds fresh state from params and decodes thawed state into the type."""
    async with make_manager(Typed) as m:
        got = await m.call("k", "visit", partition=None)
        assert got == Profile("anon", 1)
        ref = await m.get("j", initial_state={"name": "jo"})
        assert await ref.call("v") == Profile("jo", 1)
        await m.stop("j")
        thawed = await m.call("j", "v")
        assert isinstance(thawed, Profile)
        assert thawed == Profile("jo", 2)


async def test_migration_on_thaw_and_refusing_newer_versions(make_manager: Any) -> None:
    """Older checkpoints go through migrate(); a newer state_version refuses to thaw and is left as is."""
    storage = keyhive.MemoryStorage()

    class V1(keyhive.Agent):
        async def handle(self, message: Any) -> Any:
            self.state["n"] = self.state.get("n", 0) + 1
            return self.state

    class V2(keyhive.Agent):
        state_version = 2

        def migrate(self, data: Any, from_version: int) -> Any:
            assert from_version == 1
            return {"count": data["n"], "migrated": True}

        async def handle(self, message: Any) -> Any:
            return self.state

    class V3NoMigrate(keyhive.Agent):
        state_version = 3

        async def handle(self, message: Any) -> Any:
            return self.state

    async with make_manager(V1, storage=storage, name="mig") as m:
        await m.call("k", "x")
        await m.call("k", "x")
    async with make_manager(V2, storage=storage, name="mig") as m:
        assert await m.call("k", "x") == {"count": 2, "migrated": True}
    skey = storage_key("mig", None, "k")
    written_by_v2 = await storage.load(skey)
    async with make_manager(V1, storage=storage, name="mig") as m:
        with pytest.raises(keyhive.ThawError, match="newer"):
            await m.get("k")
    async with make_manager(V3NoMigrate, storage=storage, name="mig") as m:
        with pytest.raises(keyhive.ThawError, match="migrate"):
            await m.get("k")
    assert await storage.load(skey) == written_by_v2


async def test_unencodable_state_keeps_the_agent(make_manager: Any) -> None:
    """A state the codec cannot encode makes stop raise CodecError and the agent stays alive."""
    async with make_manager() as m:
        ref = await m.get("k")
        await ref.call(("set", "bad", {1, 2}))
        with pytest.raises(keyhive.CodecError):
            await m.stop("k")
        assert ref.alive
        await ref.call(("set", "bad", [1, 2]))
        await m.stop("k")


async def test_max_state_bytes(make_manager: Any) -> None:
    """A state over max_state_bytes is refused with a CodecError naming the limit; the agent stays."""
    async with make_manager(max_state_bytes=200) as m:
        ref = await m.get("k")
        await ref.call(("set", "blob", "x" * 500))
        with pytest.raises(keyhive.CodecError, match="max_state_bytes=200"):
            await m.stop("k")
        assert ref.alive
        await ref.call(("set", "blob", ""))


async def test_failing_on_start_starts_nothing(make_manager: Any) -> None:
    """An exception in on_start reaches the getter and leaves no agent registered."""

    class BadStart(keyhive.Agent):
        async def on_start(self, thawed: bool) -> None:
            raise ValueError("cannot start")

        async def handle(self, message: Any) -> Any:
            return None

    async with make_manager(BadStart) as m:
        with pytest.raises(ValueError, match="cannot start"):
            await m.get("k")
        assert (await m.stats()).total == 0


@pytest.mark.looptime
async def test_close_retries_until_its_deadline_then_names_unsaved_keys(make_manager: Any) -> None:
    """Close keeps trying to save until close_timeout, then raises naming the keys it could not save."""
    storage = FaultyStorage()
    m = make_manager(storage=storage, close_timeout=10, retry_backoff=(1, 2))
    await m.start()
    for key in ["a", "b"]:
        await m.call(key, "incr")
    storage.fail_save = True
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(keyhive.UnsavedAgentsError) as info:
        await m.close()
    assert 9 <= loop.time() - start <= 12
    assert sorted(info.value.keys) == [(None, "a"), (None, "b")]
    assert "'a'" in str(info.value)
    assert not m.running


@pytest.mark.looptime
async def test_close_recovers_when_storage_comes_back(make_manager: Any) -> None:
    """A storage outage during close is ridden out when storage recovers before the deadline."""
    storage = FaultyStorage()
    m = make_manager(storage=storage, close_timeout=30, retry_backoff=(1, 2))
    await m.start()
    await m.call("a", "incr")
    storage.fail_save = 3
    await m.close()
    assert storage.saves == 1


async def test_close_is_shielded_from_cancellation(make_manager: Any) -> None:
    """Cancelling the task that closes a manager does not stop the drain: every agent is saved."""
    storage = FaultyStorage()
    m = make_manager(storage=storage)
    await m.start()
    for i in range(10):
        await m.call(i, "incr")
    storage.save_delay = 0.05
    closer = asyncio.create_task(m.close())
    await asyncio.sleep(0.01)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    await m.close()  # waits for the drain under way
    assert storage.saves == 10
    assert not m.running


async def test_self_stop_during_close_is_saved(make_manager: Any) -> None:
    """An agent that stops itself while the manager closes is saved by the drain, not dropped."""
    storage = FaultyStorage()
    m = make_manager(storage=storage)
    await m.start()
    ref = await m.get("k")
    await ref.call("incr")
    storage.save_delay = 0.05
    other = await m.get("other")
    closing = asyncio.create_task(m.close())
    await asyncio.sleep(0)
    with contextlib.suppress(keyhive.AgentStopped):
        await ref.call("stop")
    await closing
    assert ref.stop_reason in (keyhive.StopReason.SHUTDOWN, keyhive.StopReason.NORMAL)
    assert other.stop_reason is keyhive.StopReason.SHUTDOWN
    stored = await storage.load(storage_key(m.name, None, "k"))
    assert stored is not None

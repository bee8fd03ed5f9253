"""Every promise kept: one regression test per bug of the "acknowledged data" issue list.

Each test drives the public API (plus the registry size for the partition leak) and pins
what SPEC §2-§9 promise: no overwrite of another incarnation's write, close within its
deadline, no ref that crashes, no batch wedged by one hook, no shared store closed, no
leak, bounded storage calls, codec failures reported at once, unreachable servers found
at start, and nothing written for an unchanged state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import pytest

import keyhive
from keyhive import _manager
from keyhive._keys import storage_key
from keyhive.codecs import peek_writer, unpack
from keyhive.testing import EventRecorder, FaultyStorage


class Box(keyhive.Agent):
    """An agent whose state is whatever the last ``("put", value)`` left under ``"v"``."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"v": 0, **params}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["v"] += 1
        elif isinstance(message, tuple) and message[0] == "put":
            self.state["v"] = message[1]
        elif isinstance(message, tuple) and message[0] == "sleep":
            await asyncio.sleep(message[1])
        elif message == "wiggle":  # change the state, then change it back, in one turn
            old = self.state["v"]
            self.state["v"] = old + 100
            await asyncio.sleep(0)
            self.state["v"] = old
        return self.state["v"]


class Hang:
    """A user-written backend whose load and/or writes never answer."""

    def __init__(self, *, load: bool = False, save: bool = False) -> None:
        self.inner = keyhive.MemoryStorage()
        self.hang_load = load
        self.hang_save = save
        self.started_saves = 0

    async def _never(self) -> None:
        await asyncio.get_running_loop().create_future()

    async def load(self, key: str) -> Any:
        if self.hang_load:
            await self._never()
        return await self.inner.load(key)

    async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
        self.started_saves += 1
        if self.hang_save:
            await self._never()
        version: int = await self.inner.save(key, data, expected_version=expected_version)
        return version

    async def save_many(self, items: Any) -> list[Any]:
        self.started_saves += len(items)
        if self.hang_save:
            await self._never()
        return [await self.inner.save(i.key, i.data, expected_version=i.expected_version) for i in items]

    async def delete(self, key: str) -> bool:
        removed: bool = await self.inner.delete(key)
        return removed

    async def aclose(self) -> None:
        pass


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- 1. a retry never overwrites another incarnation's identical write ----------------------------


@pytest.mark.looptime
@pytest.mark.parametrize("fault", ["lost_replies", "fail_save"])
async def test_a_retry_never_overwrites_another_writers_identical_bytes(make_manager: Any,
                                                                        fault: str) -> None:
    """After a failed stop() write (lost reply or plain failure), another manager instance saves
    the very same bytes; the retry raises ConflictError instead of adopting and overwriting
    that write (identity is writer + seq in the envelope, never the bytes, SPEC §9)."""
    inner = keyhive.MemoryStorage()
    storage = FaultyStorage(inner)
    name = _unique("lost")
    skey = storage_key(name, None, "k")
    a = make_manager(Box, name=name, storage=storage)
    async with a:
        await a.call("k", "incr")  # {"v": 1}
        setattr(storage, fault, 1)
        with pytest.raises(keyhive.StorageError):
            await a.stop("k")  # lost_replies: landed as version 1; fail_save: nothing stored
        ref_a = await a.lookup("k")
        assert ref_a is not None and ref_a.alive  # kept alive: it cannot know what landed

        # Another incarnation (a second manager instance of the same name on the same storage)
        # stores {"v": 1} too, as a newer version.
        del _manager._running[name]  # stand-in for "another process": let the second one start
        try:
            b = make_manager(Box, name=name, storage=inner)
            async with b:
                if fault == "lost_replies":  # thaws A's write; must write {"v": 1} over it anew
                    assert await b.call("k", "incr") == 2
                    await b.stop("k")
                    assert await b.call("k", ("put", 1)) == 1
                else:
                    assert await b.call("k", "incr") == 1
                await b.stop("k")
        finally:
            _manager._running[name] = a
        theirs = await inner.load(skey)
        assert theirs.version == (3 if fault == "lost_replies" else 1)
        assert unpack(theirs.data).payload == a._core.io.encode_payload(ref_a._agent)  # identical

        with pytest.raises(keyhive.ConflictError):
            await a.stop("k")
        after = await inner.load(skey)
        assert (after.version, after.data) == (theirs.version, theirs.data)  # never overwritten
        writer = peek_writer(after.data)
        assert writer is not None and writer[0] != a._core.io.writer
        with pytest.raises(keyhive.UnsavedAgentsError, match="'k'"):
            await a.close()  # the conflict cannot succeed on retry: reported, not written
        assert (await inner.load(skey)).data == theirs.data


# -- 2. close keeps close_timeout while a drain write hangs -------------------------------------


@pytest.mark.looptime
async def test_close_keeps_close_timeout_while_a_write_hangs(make_manager: Any) -> None:
    """A backend whose save and save_many never return: close(close_timeout=1) raises
    UnsavedAgentsError naming the key within about 1 s of loop time (SPEC §8)."""
    storage = Hang()
    m = make_manager(Box, storage=storage, close_timeout=1)
    await m.start()
    await m.call("stuck", "incr")
    storage.hang_save = True
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(10):  # a hang fails the test instead of stalling it
        with pytest.raises(keyhive.UnsavedAgentsError, match="'stuck'") as info:
            await m.close()
    assert loop.time() - began <= 1.5
    assert storage.started_saves >= 1
    assert info.value.keys == [(None, "stuck")]
    assert not m.running


# -- 3. a get still loading when close runs -----------------------------------------------------


@pytest.mark.looptime
async def test_get_still_loading_when_close_runs_raises_manager_closed(make_manager: Any) -> None:
    """A get whose thaw is still loading when close() begins fails with ManagerClosed; it never
    returns a ref whose call then crashes (SPEC §2)."""
    storage = FaultyStorage()
    m = make_manager(Box, storage=storage)
    await m.start()
    storage.load_delay = 5.0
    getting = asyncio.create_task(m.get("late"))
    await asyncio.sleep(1)
    closing = asyncio.create_task(m.close())
    await asyncio.sleep(0)
    try:
        ref = await getting
    except keyhive.ManagerClosed:
        pass
    else:
        pytest.fail(f"get returned {ref!r} after close began")
    await closing
    assert not m.running


# -- 4. a BaseException from a hook fails that agent alone ---------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize("hook", ["on_hibernate", "on_stop"])
async def test_base_exception_from_one_hook_does_not_wedge_its_batch(make_manager: Any, hook: str,
                                                                     caplog: Any) -> None:
    """A CancelledError raised by one agent's on_hibernate/on_stop fails only that agent: the
    20 others of the same hibernate batch idle out, thaw on get, and close names only it."""

    class Hooked(Box):
        async def on_hibernate(self) -> None:
            if hook == "on_hibernate" and self.key == "guilty":
                raise asyncio.CancelledError("raised by the hook itself")

        async def on_stop(self, reason: keyhive.StopReason) -> None:
            if hook == "on_stop" and self.key == "guilty":
                raise asyncio.CancelledError("raised by the hook itself")

    storage = FaultyStorage()
    innocent = [f"k{i}" for i in range(20)]
    m = make_manager(Hooked, storage=storage, idle_timeout=10, close_timeout=3)
    await m.start()
    events = EventRecorder(m)
    for key in [*innocent, "guilty"]:
        await m.call(key, "incr")
    for key in innocent:
        await events.wait_for("hibernated", key, timeout=60)
    assert storage.save_batches == 1  # one batch held them all, the guilty one included
    for key in innocent:
        assert await m.call(key, "get") == 1  # thawed
    try:
        await m.close()
    except keyhive.UnsavedAgentsError as exc:
        assert exc.keys == [(None, "guilty")]
    assert not m.running
    assert "guilty" in caplog.text


# -- 5. memory:// never closes the process-wide store --------------------------------------------


async def test_memory_url_managers_never_close_the_process_wide_store() -> None:
    """Two managers on storage='memory://': closing one leaves the shared store working for the
    other, which still saves and thaws (SPEC §2)."""
    first = keyhive.InstanceManager(_unique("mem-a"), Box, storage="memory://")
    second = keyhive.InstanceManager(_unique("mem-b"), Box, storage="memory://")
    default = keyhive.InstanceManager(_unique("mem-c"), Box)
    async with second, default:
        async with first:
            await first.call("k", "incr")
        await second.call("k", ("put", 7))
        await second.stop("k")  # saves into the shared store
        assert await second.call("k", "get") == 7  # thawed from it
        await default.call("k", ("put", 3))
        await default.stop("k")
        assert await default.call("k", "get") == 3
    async with first:  # and the closed one starts again on the same store
        assert await first.call("k", "get") == 1


# -- 6. empty partition registries are freed ------------------------------------------------------


async def test_one_shot_partitions_leave_no_registry_behind(make_manager: Any) -> None:
    """10,000 one-shot partitions (get + stop each) leave at most 2 registries, and stats()
    stays fast (SPEC §5)."""
    async with make_manager(Box) as m:
        for i in range(10_000):
            await m.get("k", partition=f"tenant-{i}")
            await m.stop("k", partition=f"tenant-{i}")
        assert len(m._core.regs) <= 2
        began = time.perf_counter()
        for _ in range(100):
            stats = await m.stats()
        per_call = (time.perf_counter() - began) / 100
        assert stats.total == 0
        assert per_call < 0.001, f"stats() took {per_call * 1e6:.0f} us"


# -- 7. storage_timeout bounds every backend call -------------------------------------------------


@pytest.mark.looptime
async def test_storage_timeout_bounds_a_hanging_load_and_a_hanging_save(make_manager: Any) -> None:
    """A load that never answers makes get raise ThawError after storage_timeout; a save that
    never answers makes stop raise StorageError and the agent keeps running (SPEC §8)."""
    storage = Hang(load=True)
    loop = asyncio.get_running_loop()
    m = make_manager(Box, storage=storage, storage_timeout=2, close_timeout=1)
    async with m:
        began = loop.time()
        with pytest.raises(keyhive.ThawError) as thaw:
            await m.get("k")
        assert 2 <= loop.time() - began < 3
        assert isinstance(thaw.value.__cause__, TimeoutError | keyhive.StorageError)
        assert await m.lookup("k") is None

        storage.hang_load = False
        await m.call("k", "incr")
        storage.hang_save = True
        began = loop.time()
        with pytest.raises(keyhive.StorageError):
            await m.stop("k")
        assert 2 <= loop.time() - began < 3
        ref = await m.lookup("k")
        assert ref is not None and ref.alive
        assert await ref.call("incr") == 2
        storage.hang_save = False


# -- 8. codec failures: logged once, reported by close at once, validate_state -------------------


class Setty(Box):
    """Puts a set into its state on ("bad",): JSON cannot encode it."""

    async def handle(self, message: Any) -> Any:
        if message == "bad":
            self.state["tags"] = {"a", "b"}
            return None
        if message == "fix":
            self.state["tags"] = sorted(self.state.pop("tags", ()))
            return None
        return await super().handle(message)


@pytest.mark.looptime
async def test_codec_error_is_logged_once_and_close_reports_it_at_once(make_manager: Any,
                                                                       caplog: Any) -> None:
    """An unencodable state is logged once at ERROR with the key and a hint, however often the
    hibernate is retried; close reports it at once, the cause in the message (SPEC §4)."""
    caplog.set_level(logging.ERROR, logger="keyhive")
    m = make_manager(Setty, idle_timeout=5, close_timeout=30, retry_backoff=(1, 1))
    await m.start()
    events = EventRecorder(m)
    await m.call("tagged", "bad")
    await events.wait_count("hibernate_failed", 3, "tagged", timeout=60)
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "'tagged'" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "list instead of a set" in logged[0].getMessage()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(keyhive.UnsavedAgentsError) as info:
        await m.close()
    assert loop.time() - began < 1, "close retried a codec failure that cannot succeed"
    assert info.value.keys == [(None, "tagged")]
    assert isinstance(info.value.errors[0], keyhive.CodecError)
    assert "set" in str(info.value)


async def test_validate_state_fails_the_call_that_made_the_state_unencodable(make_manager: Any) -> None:
    """With validate_state=True the call whose handler left an unencodable state raises
    CodecError, and the agent keeps running."""
    async with make_manager(Setty, validate_state=True) as m:
        assert await m.call("k", "incr") == 1
        with pytest.raises(keyhive.CodecError):
            await m.call("k", "bad")
        await m.call("k", "fix")
        assert await m.call("k", "incr") == 2


# -- 9. an unreachable server is found at start() -----------------------------------------------


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "postgresql://u:p@127.0.0.1:1/db"])
async def test_unreachable_server_is_found_at_start(url: str) -> None:
    """start() on a closed port raises StorageError naming host, port and the OS error."""
    pytest.importorskip("redis" if url.startswith("redis") else "asyncpg")
    m = keyhive.InstanceManager(_unique("unreachable"), Box, storage=url)
    with pytest.raises(keyhive.StorageError) as info:
        await m.start()
    text = str(info.value)
    assert "127.0.0.1" in text and ":1" in text
    assert "111" in text or "refused" in text.lower(), text  # the OS error (ECONNREFUSED)
    assert not m.running
    with pytest.raises(keyhive.ManagerClosed):
        await m.get("k")


# -- 11. the closing rule --------------------------------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize(("key", "partition"), [("k", None), (("t", 1), None), ("k", "p")])
async def test_once_close_began_live_keys_are_not_served(make_manager: Any, key: Any,
                                                         partition: Any) -> None:
    """While close drains a still-live key (its write slowed), get and call raise ManagerClosed
    and lookup returns None or raises ManagerClosed."""
    storage = FaultyStorage()
    m = make_manager(Box, storage=storage)
    await m.start()
    await m.call(key, "incr", partition=partition)
    storage.save_delay = 5.0
    closing = asyncio.create_task(m.close())
    await asyncio.sleep(1)
    assert storage.in_flight == 1  # the drain write is under way: the key is still live
    with pytest.raises(keyhive.ManagerClosed):
        await m.get(key, partition=partition)
    with pytest.raises(keyhive.ManagerClosed):
        await m.call(key, "incr", partition=partition)
    with contextlib.suppress(keyhive.ManagerClosed):  # either answer keeps the rule
        assert await m.lookup(key, partition=partition) is None
    await closing
    assert (await storage.inner.load(storage_key(m.name, partition, key))).version == 1


# -- 12. an unchanged state writes nothing --------------------------------------------------------


async def test_unchanged_state_writes_nothing(make_manager: Any) -> None:
    """A never-used fresh key, a thaw followed by read-only calls, and (checkpoint='turn') a turn
    that changes the state and changes it back all write nothing (SPEC §9)."""
    storage = FaultyStorage()
    async with make_manager(Box, storage=storage) as m:
        await m.get("fresh")
        await m.stop("fresh")
        assert storage.saves == 0
        assert await storage.inner.load(storage_key(m.name, None, "fresh")) is None

        await m.call("k", "incr")
        await m.stop("k")
        assert storage.saves == 1
        for _ in range(3):
            assert await m.call("k", "get") == 1  # thawed, read only
        await m.stop("k")
        assert storage.saves == 1
        assert (await storage.inner.load(storage_key(m.name, None, "k"))).version == 1

    storage = FaultyStorage()
    async with make_manager(Box, storage=storage, checkpoint="turn") as m:
        await m.call("k", ("put", 5))
        assert storage.saves == 1
        assert await m.call("k", "wiggle") == 5  # changed and changed back: nothing to write
        await m.call("k", ("put", 5))
        await m.call("k", "get")
        assert storage.saves == 1
        await m.stop("k")
        assert storage.saves == 1
        assert (await storage.inner.load(storage_key(m.name, None, "k"))).version == 1

"""storage_timeout on thaws (SPEC §8): loads share one timer, and each one is still bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import keyhive
from keyhive.testing import FaultyStorage

pytestmark = pytest.mark.looptime


async def _seed(make_manager: Any, storage: Any, keys: list[Any]) -> None:
    async with make_manager(storage=storage, name="seeded") as m:
        for key in keys:
            await m.call(key, "incr")


async def test_a_load_over_storage_timeout_fails_the_get(make_manager: Any) -> None:
    """A load slower than storage_timeout fails its get with ThawError (cause TimeoutError) at the deadline."""
    loop = asyncio.get_running_loop()
    storage = FaultyStorage()
    await _seed(make_manager, storage, ["k"])
    async with make_manager(name="seeded", storage=storage, storage_timeout=5.0) as m:
        storage.load_delay = 60
        start = loop.time()
        with pytest.raises(keyhive.ThawError) as info:
            await m.get("k")
        assert isinstance(info.value.__cause__, TimeoutError)
        assert 5.0 <= loop.time() - start < 5.5
        assert await m.lookup("k") is None  # nothing was started
        storage.load_delay = 0
        assert await m.call("k", "get") == 1  # the next get thaws as usual


async def test_many_slow_loads_time_out_each_at_its_own_deadline(make_manager: Any) -> None:
    """Loads begun at different times each fail storage_timeout after their own start; answered ones thaw."""
    loop = asyncio.get_running_loop()
    storage = FaultyStorage()
    await _seed(make_manager, storage, list(range(30)))
    async with make_manager(name="seeded", storage=storage, storage_timeout=10.0) as m:
        ended: dict[int, tuple[float, str]] = {}

        async def get(key: int) -> None:
            start = loop.time()
            try:
                await m.get(key)
                ended[key] = (loop.time() - start, "thawed")
            except keyhive.ThawError as exc:
                assert isinstance(exc.__cause__, TimeoutError)
                ended[key] = (loop.time() - start, "timeout")

        storage.load_delay = 100  # these never answer in time
        slow = [asyncio.create_task(get(k)) for k in range(20)]
        await asyncio.sleep(4)
        storage.load_delay = 3  # within the bound
        fast = [asyncio.create_task(get(k)) for k in range(20, 30)]
        late = [asyncio.create_task(get(k)) for k in range(10, 20)]  # wait on the slow ones' thaws
        await asyncio.gather(*slow, *fast, *late)
        for key in range(20):
            took, how = ended[key]
            assert how == "timeout"
            assert 10.0 <= took < 10.5 if key < 10 else took < 6.5
        for key in range(20, 30):
            took, how = ended[key]
            assert how == "thawed" and 3.0 <= took < 3.5
        assert await m.call(5, "get") == 1


async def test_a_caller_cancelling_its_get_is_not_a_timeout(make_manager: Any) -> None:
    """A get cancelled by its caller during a load raises CancelledError, and the key can be got again."""
    storage = FaultyStorage()
    await _seed(make_manager, storage, ["k"])
    async with make_manager(name="seeded", storage=storage, storage_timeout=5.0) as m:
        storage.load_delay = 3
        task = asyncio.create_task(m.get("k"))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(10)  # past the load's deadline: nothing fires into another task
        storage.load_delay = 0
        assert await m.call("k", "get") == 1


async def test_an_outer_timeout_shorter_than_storage_timeout_wins(make_manager: Any) -> None:
    """A caller's own asyncio.timeout ends a slow thaw at its deadline, as its own TimeoutError."""
    loop = asyncio.get_running_loop()
    storage = FaultyStorage()
    await _seed(make_manager, storage, ["k"])
    async with make_manager(name="seeded", storage=storage, storage_timeout=50.0) as m:
        storage.load_delay = 100
        start = loop.time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2):
                await m.get("k")
        assert 2.0 <= loop.time() - start < 2.5
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_callers_timeout_at_the_same_deadline_stays_the_callers(make_manager: Any) -> None:
    """When the caller's asyncio.timeout and storage_timeout expire together, the caller's TimeoutError wins."""
    storage = FaultyStorage()
    await _seed(make_manager, storage, ["k"])
    async with make_manager(name="seeded", storage=storage, storage_timeout=4.0) as m:
        storage.load_delay = 100
        with pytest.raises(TimeoutError):  # not a ThawError: the cancel was the caller's too
            async with asyncio.timeout(4):
                await m.get("k")
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_storage_timeout_inside_a_callers_longer_timeout(make_manager: Any) -> None:
    """Under a caller's longer asyncio.timeout, storage_timeout fails the thaw first, as a ThawError."""
    storage = FaultyStorage()
    await _seed(make_manager, storage, ["k"])
    async with make_manager(name="seeded", storage=storage, storage_timeout=3.0) as m:
        storage.load_delay = 100
        async with asyncio.timeout(60):
            with pytest.raises(keyhive.ThawError):
                await m.get("k")
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_int_keys_get_the_same_live_ref_and_bools_are_refused(make_manager: Any) -> None:
    """get of a live int key returns its ref; True is not the key 1; a huge int is still refused."""
    async with make_manager() as m:
        ref = await m.get(1)
        assert await m.get(1) is ref
        assert await m.get(-(2**63)) is not ref
        with pytest.raises(TypeError):
            await m.get(True)
        with pytest.raises(ValueError, match="1024"):
            await m.get(10**1100)
        assert (await m.stats()).count == 2

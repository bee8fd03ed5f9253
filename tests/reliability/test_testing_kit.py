"""The public test kit: FaultyStorage's programmable faults and EventRecorder's awaitable helpers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import keyhive
from keyhive._keys import storage_key
from keyhive.testing import EventRecorder, FaultyStorage, StorageFault

pytestmark = pytest.mark.looptime


class Counter(keyhive.Agent):
    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"n": 0}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["n"] += 1
        return self.state["n"]


async def test_fail_the_next_n_saves_then_recover() -> None:
    """fail_save=N fails exactly the next N saves."""
    storage = FaultyStorage()
    storage.fail_save = 2
    for _ in range(2):
        with pytest.raises(StorageFault):
            await storage.save("k", b"x", expected_version=None)
    assert await storage.save("k", b"x", expected_version=None) == 1
    assert storage.faults["save"] == 2
    assert storage.faulted_keys["save"] == {"k"}


async def test_faults_only_for_some_keys() -> None:
    """fault_keys limits faults (and their budgets) to the chosen keys."""
    storage = FaultyStorage()
    storage.fault_keys = {"bad"}
    storage.fail_save = 1
    assert await storage.save("good", b"x", expected_version=None) == 1
    with pytest.raises(StorageFault):
        await storage.save("bad", b"x", expected_version=None)
    assert await storage.save("bad", b"x", expected_version=None) == 1
    storage.fault_keys = lambda key: key.startswith("b")
    storage.fail_load = True
    assert await storage.load("good") is not None
    with pytest.raises(StorageFault):
        await storage.load("bad")


async def test_torn_write_reports_success_and_stale_read_returns_the_previous_checkpoint() -> None:
    """torn_saves stores a prefix and reports success; stale_loads serves the checkpoint before the last write."""
    storage = FaultyStorage(seed=1)
    await storage.save("k", b"first", expected_version=None)
    await storage.save("k", b"second", expected_version=1)
    storage.stale_loads = 1
    assert (await storage.load("k")) == keyhive.Checkpoint(b"first", 1)
    assert (await storage.load("k")) == keyhive.Checkpoint(b"second", 2)
    storage.torn_saves = 1
    assert await storage.save("k", b"third-and-long", expected_version=2) == 3
    torn = await storage.load("k")
    assert torn is not None and torn.data != b"third-and-long" and b"third-and-long".startswith(torn.data)
    assert storage.faults == {"stale": 1, "torn": 1}
    storage.heal()
    assert storage.torn_saves is False and storage.stale_loads is False


async def test_torn_checkpoint_is_a_thaw_error_through_the_manager() -> None:
    """A torn write from the kit is caught by the checkpoint envelope on the next thaw."""
    storage = FaultyStorage()
    async with keyhive.InstanceManager("kit-torn", Counter, storage=storage) as m:
        await m.call("k", "incr")
        storage.torn_saves = 1
        await m.stop("k")
        before = await storage.inner.load(storage_key("kit-torn", None, "k"))
        with pytest.raises(keyhive.ThawError):
            await m.get("k")
        assert await storage.inner.load(storage_key("kit-torn", None, "k")) == before


async def test_random_faults_are_reproducible_with_a_seed() -> None:
    """Two storages with the same seed and rates inject the same faults."""
    outcomes = []
    for _ in range(2):
        storage = FaultyStorage(seed=42)
        storage.save_error_rate = 0.5
        seen = []
        for i in range(40):
            try:
                await storage.save(f"k{i}", b"x", expected_version=None)
                seen.append(True)
            except StorageFault:
                seen.append(False)
        outcomes.append(seen)
    assert outcomes[0] == outcomes[1]
    assert True in outcomes[0] and False in outcomes[0]


async def test_delays_accept_a_callable_and_in_flight_counts() -> None:
    """A callable delay is drawn per call; in_flight counts calls under way; settled() waits for them."""
    storage = FaultyStorage()
    storage.save_delay = lambda: 5.0
    task = asyncio.create_task(storage.save("k", b"x", expected_version=None))
    await asyncio.sleep(1)
    assert storage.in_flight == 1
    await asyncio.wait_for(storage.settled(), 10)
    assert storage.in_flight == 0 and await task == 1


async def test_recorder_helpers() -> None:
    """wait_for, wait_next, wait_count, of, count and the context manager."""
    storage = FaultyStorage()
    async with keyhive.InstanceManager("kit-rec", Counter, idle_timeout=60, storage=storage,
                                       retry_backoff=(1, 1)) as m:
        with EventRecorder(m) as events:
            await m.call("k", "incr")
            first = await events.wait_for("hibernated", "k", timeout=120)
            assert first.reason is keyhive.StopReason.IDLE_TIMEOUT
            assert events.kinds("k") == ["started", "idle", "hibernated", "stopped"]
            storage.fail_save = True
            await m.call("k", "incr")
            assert (await events.wait_for("thawed", "k", timeout=1)).key == "k"
            failures = await events.wait_count("hibernate_failed", 3, "k", timeout=120)
            assert len(failures) == 3 and events.count("hibernate_failed") >= 3
            storage.fail_save = False
            again = await events.wait_next("hibernated", "k", timeout=120)
            assert again is not first and events.count("hibernated", "k") == 2
            assert [e.kind for e in events.of("stopped")] == ["stopped", "stopped"]
            with pytest.raises(TimeoutError):
                await events.wait_next("started", "nobody", timeout=5)
        await m.call("k", "incr")
        await m.stop("k")
        assert events.count("stopped") == 2  # unsubscribed: the last thaw was not recorded


async def test_the_module_docstring_recipe_runs() -> None:
    """The recipe in keyhive.testing's docstring works as written."""
    import keyhive.testing

    doc = keyhive.testing.__doc__
    assert doc is not None
    body = doc[doc.index("    @pytest.mark.looptime"):].split("\n\n")[0]
    source = "\n".join(line[4:] for line in body.splitlines())
    namespace: dict[str, Any] = {
        "pytest": pytest, "InstanceManager": keyhive.InstanceManager, "MyAgent": Counter,
        "FaultyStorage": FaultyStorage, "EventRecorder": EventRecorder,
    }
    exec(source, namespace)
    await namespace["test_my_agent_hibernates"]()

"""Durable timers (SPEC §12) on virtual time: schedule, replace, unschedule, periodic, catch-up, retries."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import keyhive
from keyhive import EventKind
from keyhive._keys import storage_key
from keyhive.testing import EventRecorder

pytestmark = pytest.mark.looptime

EPS = 1e-5  # wall times near 1.7e9 carry ~2e-7 s of float rounding through the clock offset


class Clock(keyhive.Agent):
    """Schedules what it is told to and records, by loop time, every message a timer brings."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"got": [], "failures": 0, **params}

    async def handle(self, message: Any) -> Any:
        kind = message[0]
        if kind == "schedule":
            _, name, when, msg, every = message
            self.schedule(name, when, msg, every=every)
        elif kind == "at":
            self.schedule(message[1], datetime.fromisoformat(message[2]), message[3])
        elif kind == "unschedule":
            return self.unschedule(message[1])
        elif kind == "tick":
            self.state["got"].append([message[1], asyncio.get_running_loop().time()])
        elif kind == "flaky":  # fails the first n deliveries
            if self.state["failures"] < message[2]:
                self.state["failures"] += 1
                raise RuntimeError(f"flaky {self.state['failures']}")
            self.state["got"].append([message[1], asyncio.get_running_loop().time()])
        elif kind == "get":
            return self.state
        return None


async def _schedule(m: keyhive.InstanceManager, key: str, name: str, when: Any, msg: Any,
                    every: Any = None) -> None:
    await m.call(key, ["schedule", name, when, msg, every])


async def test_timer_wakes_a_hibernated_agent(make_manager: Any) -> None:
    """A timer due after its agent hibernated thaws the agent and delivers its message on time."""
    loop = asyncio.get_running_loop()
    async with make_manager(Clock, idle_timeout=10) as m:
        with EventRecorder(m) as rec:
            t0 = loop.time()
            await _schedule(m, "k", "wake", 100, ["tick", "wake"])
            await rec.wait_for(EventKind.HIBERNATED, "k")
            assert await m.lookup("k") is None
            fired = await rec.wait_for(EventKind.TIMER_FIRED, "k", timeout=200)
            assert abs(fired.time - (t0 + 100)) < EPS
            assert rec.count(EventKind.THAWED, "k") == 1
            state = await (await m.get("k")).state()
            assert [tag for tag, _ in state["got"]] == ["wake"]


async def test_schedule_again_replaces_the_timer(make_manager: Any) -> None:
    """Scheduling a name again replaces that timer: only the new message arrives, at the new time."""
    loop = asyncio.get_running_loop()
    async with make_manager(Clock) as m:
        t0 = loop.time()
        await _schedule(m, "k", "t", 50, ["tick", "first"])
        await _schedule(m, "k", "t", 80, ["tick", "second"])
        await asyncio.sleep(200)
        got = (await m.call("k", ["get"]))["got"]
        assert [tag for tag, _ in got] == ["second"]
        assert abs(got[0][1] - (t0 + 80)) < EPS


async def test_unschedule_cancels(make_manager: Any) -> None:
    """An unscheduled timer never fires, and unschedule says whether there was one."""
    async with make_manager(Clock) as m:
        await _schedule(m, "k", "t", 50, ["tick", "never"])
        await _schedule(m, "k", "u", 60, ["tick", "kept"])
        assert await m.call("k", ["unschedule", "t"]) is True
        assert await m.call("k", ["unschedule", "t"]) is False
        await asyncio.sleep(200)
        assert [tag for tag, _ in (await m.call("k", ["get"]))["got"]] == ["kept"]


async def test_periodic_timer_does_not_drift(make_manager: Any) -> None:
    """A periodic timer fires at t0 + k * every exactly, for 100 periods."""
    loop = asyncio.get_running_loop()
    async with make_manager(Clock) as m:
        with EventRecorder(m) as rec:
            t0 = loop.time()
            await _schedule(m, "k", "beat", 7.3, ["tick", "beat"], every=7.3)
            fired = await rec.wait_count(EventKind.TIMER_FIRED, 100, "k", timeout=1000)
            await m.call("k", ["unschedule", "beat"])
        for k, event in enumerate(fired, start=1):
            assert abs(event.time - (t0 + k * 7.3)) < EPS, (k, event.time - t0)


async def test_catch_up_after_downtime_fires_once(make_manager: Any) -> None:
    """A periodic timer overdue by many periods while no manager ran fires once, then keeps its phase."""
    loop = asyncio.get_running_loop()
    storage = keyhive.MemoryStorage()
    first = make_manager(Clock, storage=storage, name="catchup")
    async with first as m:
        t0 = loop.time()
        await _schedule(m, "k", "beat", 10, ["tick", "beat"], every=10)
    await asyncio.sleep(1000)  # nothing runs for 100 periods
    second = make_manager(Clock, storage=storage, name="catchup")
    async with second as m:
        with EventRecorder(m) as rec:
            restarted = loop.time()
            await rec.wait_for(EventKind.TIMER_FIRED, "k", timeout=5)
            await asyncio.sleep(25)
            got = (await m.call("k", ["get"]))["got"]
    times = [at - t0 for _, at in got]
    assert times[0] - (restarted - t0) < 1.01  # caught up within the first poll
    assert len(times) == 3  # once for all the missed periods, then at 1010 and 1020
    assert abs(times[1] - 1010) < EPS and abs(times[2] - 1020) < EPS


async def test_failing_handler_is_retried_with_backoff(make_manager: Any) -> None:
    """A handler that raises is retried with retry_backoff until it succeeds, once per due time."""
    loop = asyncio.get_running_loop()
    async with make_manager(Clock, retry_backoff=(2, 60), timer_retries=5) as m:
        t0 = loop.time()
        await _schedule(m, "k", "t", 10, ["flaky", "ok", 3])
        await asyncio.sleep(100)
        state = await m.call("k", ["get"])
        assert state["failures"] == 3
        assert len(state["got"]) == 1
        assert abs(state["got"][0][1] - (t0 + 10 + 2 + 4 + 8)) < EPS  # backoff 2, 4, 8


async def test_timer_dropped_after_retries_with_an_event(make_manager: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A timer failing past timer_retries is dropped: logged with the key, TIMER_DROPPED emitted."""
    async with make_manager(Clock, retry_backoff=(1, 1), timer_retries=2) as m:
        with EventRecorder(m) as rec, caplog.at_level(logging.ERROR, logger="keyhive"):
            await _schedule(m, "k", "t", 5, ["flaky", "never", 99])
            dropped = await rec.wait_for(EventKind.TIMER_DROPPED, "k", timeout=100)
            assert isinstance(dropped.error, RuntimeError)
            await asyncio.sleep(100)
            state = await m.call("k", ["get"])
        assert state["failures"] == 3  # the first delivery and two retries
        assert rec.count(EventKind.TIMER_FIRED, "k") == 0
        assert any("'k'" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


async def test_when_as_aware_datetime(make_manager: Any) -> None:
    """`when` may be a timezone-aware datetime: the timer falls due at that wall time."""
    loop = asyncio.get_running_loop()
    async with make_manager(Clock) as m:
        await m.get("k")
        service = m._core.timers
        assert service is not None
        at = datetime.fromtimestamp(service.wall() + 42, tz=UTC)
        t0 = loop.time()
        await m.call("k", ["at", "t", at.isoformat(), ["tick", "dt"]])
        await asyncio.sleep(100)
        got = (await m.call("k", ["get"]))["got"]
        assert len(got) == 1 and abs(got[0][1] - (t0 + 42)) < 1e-3  # isoformat keeps microseconds


class Validating(keyhive.Agent):
    async def handle(self, message: Any) -> Any:
        name, when, msg, every = message
        self.schedule(name, when, msg, every=every)


@pytest.mark.parametrize(("args", "error", "match"), [
    (["", 1, "m", None], ValueError, "must not be empty"),
    ([5, 1, "m", None], TypeError, "name must be a str"),
    (["t", "soon", "m", None], TypeError, "seconds"),
    (["t", float("nan"), "m", None], ValueError, "finite"),
    (["t", 1, "m", 0], ValueError, "every must be a period > 0"),
    (["t", 1, "m", -5], ValueError, "every must be a period > 0"),
])
async def test_bad_arguments_are_refused(make_manager: Any, args: list[Any], error: type[Exception],
                                         match: str) -> None:
    """A bad name, time or period raises in the turn with a message saying what to write."""
    async with make_manager(Validating) as m:
        with pytest.raises(error, match=match):
            await m.call("k", tuple(args))


async def test_naive_datetime_and_unencodable_message_are_refused(make_manager: Any) -> None:
    """A naive datetime raises ValueError naming timezone-aware ones; an unencodable message, CodecError."""
    async with make_manager(Validating) as m:
        with pytest.raises(ValueError, match="timezone-aware"):
            await m.call("k", ("t", datetime(2030, 1, 1), "m", None))  # the naive one under test
        with pytest.raises(keyhive.CodecError):
            await m.call("k", ("t", 1, {1, 2}, None))
        with pytest.raises(TypeError, match="seconds"):
            await m.call("k", ("t", 1, "m", timedelta))


async def test_timers_only_turn_is_written(make_manager: Any) -> None:
    """A turn that only schedules a timer changes the checkpoint, and its due time reaches the index."""
    storage = keyhive.MemoryStorage()
    async with make_manager(Clock, storage=storage, name="only") as m:
        await m.call("k", ["get"])
        await m.stop("k")
        before = await storage.load(storage_key(m.name, None, "k"))
        await _schedule(m, "k", "t", 500, ["tick", "x"])
        await m.stop("k")
        after = await storage.load(storage_key(m.name, None, "k"))
        assert before is not None and after is not None and after.version == before.version + 1
        [(skey, _due)] = await storage.due_keys("", 1e12)
        assert skey == storage_key(m.name, None, "k")
        await m.call("k", ["unschedule", "t"])
        await m.stop("k")
        assert await storage.due_keys("", 1e12) == []


@pytest.mark.parametrize("policy", ["turn", 5.0])
async def test_timer_fired_under_checkpoint_policies(make_manager: Any, policy: Any) -> None:
    """Under checkpoint='turn' and write-behind a live timer fires and its progress is written."""
    storage = keyhive.MemoryStorage()
    async with make_manager(Clock, storage=storage, checkpoint=policy, name=f"pol-{policy}") as m:
        with EventRecorder(m) as rec:
            await _schedule(m, "k", "t", 10, ["tick", "p"])
            assert len(await storage.due_keys("", 1e12)) == (1 if policy == "turn" else 0)
            await rec.wait_for(EventKind.TIMER_FIRED, "k", timeout=20)
            await asyncio.sleep(10)
            assert await storage.due_keys("", 1e12) == []  # fired: the write took it out of the index


async def test_no_double_fire_when_poller_sees_a_live_agent(make_manager: Any) -> None:
    """The poller never wakes a live agent: a timer of an agent thawed early fires once."""
    async with make_manager(Clock, idle_timeout=3, timer_poll=5) as m:
        with EventRecorder(m) as rec:
            await _schedule(m, "k", "a", 20, ["tick", "a"], every=1)
            await asyncio.sleep(60)
            await m.call("k", ["unschedule", "a"])
            fired = rec.of(EventKind.TIMER_FIRED, "k")
        times = [round(e.time) for e in fired]
        assert len(times) == len(set(times))


async def test_bad_options_are_refused() -> None:
    """timer_poll and timer_retries are validated at construction."""
    with pytest.raises(ValueError, match="timer_poll"):
        keyhive.InstanceManager("x", Clock, timer_poll=0)
    with pytest.raises(ValueError, match="timer_retries"):
        keyhive.InstanceManager("x", Clock, timer_retries=-1)

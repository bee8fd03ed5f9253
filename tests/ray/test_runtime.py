"""The SPEC §1-§3 contract through the Ray runtime (§11), on a private local Ray cluster."""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import keyhive
from keyhive.ray import RayManager, RayRuntime, RemoteError, RemoteRef, shard_of

from .agents import Boom, Counter

pytestmark = pytest.mark.timeout(180)


def test_import_keyhive_does_not_import_ray() -> None:
    """`import keyhive` stays light: Ray is imported only by keyhive.ray."""
    code = "import sys, keyhive; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_ray_names_the_extra() -> None:
    """Without Ray installed, importing keyhive.ray fails with the pip command to run."""
    code = "import sys; sys.modules['ray'] = None\ntry:\n import keyhive.ray\nexcept ImportError as e: print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'keyhive[ray]'" in out.stdout


@pytest.mark.parametrize(("kwargs", "error", "says"), [
    ({"shards": 0}, ValueError, "shards must be >= 1"),
    ({"shards": "4"}, TypeError, "shards must be an int"),
    ({"owner_ttl": -1}, ValueError, "owner_ttl must be a positive"),
    ({"owner_ttl": "10"}, TypeError, "owner_ttl must be seconds"),
    ({"namespace": ""}, ValueError, "namespace must be a non-empty str"),
    ({"address": 5}, TypeError, "address must be a str"),
    ({"actor_options": [1]}, TypeError, "actor_options must be a dict"),
])
def test_runtime_arguments_are_validated(kwargs: dict[str, Any], error: type[Exception], says: str) -> None:
    """A bad RayRuntime argument fails in the constructor with a message saying what to write."""
    with pytest.raises(error, match=says):
        RayRuntime(**kwargs)


def test_storage_must_be_a_url() -> None:
    """A storage object cannot cross to the shard hosts: the error asks for a URL."""
    with pytest.raises(TypeError, match="storage must be a URL"):
        keyhive.InstanceManager("x", Counter, storage=keyhive.MemoryStorage(), runtime=RayRuntime())
    with pytest.raises(ValueError):
        keyhive.InstanceManager("x", Counter, storage="nosuch://x", runtime=RayRuntime())


def test_shard_hash_is_stable_and_spread() -> None:
    """The shard of a key is the same in every process (not Python's salted hash) and spreads keys."""
    code = ("from keyhive.ray import shard_of; "
            "print([shard_of('m', None, f'k{i}', 16) for i in range(50)])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
                           ).stdout for seed in ("1", "2")}
    assert len(runs) == 1
    assert json.loads(runs.pop()) == [shard_of("m", None, f"k{i}", 16) for i in range(50)]
    assert len({shard_of("m", None, i, 16) for i in range(1000)}) == 16
    assert shard_of("m", None, 1, 16) != shard_of("m", None, "1", 16) or \
        shard_of("m", None, 2, 16) != shard_of("m", None, "2", 16)
    with pytest.raises(TypeError, match="key must be str"):
        shard_of("m", None, 1.5, 16)


async def test_get_call_lookup_stop(ray_manager: RayManager) -> None:
    """get/call/lookup/stop work through the shard hosts, and refs are equal per incarnation."""
    assert isinstance(ray_manager, keyhive.InstanceManager)
    assert keyhive.get_manager(ray_manager.name) is ray_manager
    assert await ray_manager.lookup("a") is None
    ref = await ray_manager.get("a", initial_state={"count": 10})
    assert isinstance(ref, RemoteRef)
    assert (ref.key, ref.partition, ref.manager, ref.alive, ref.stop_reason) == ("a", None, ray_manager.name, True, None)
    assert await ref.call("incr") == 11
    assert await ray_manager.call("a", "incr") == 12
    again = await ray_manager.get("a")
    assert again == ref and hash(again) == hash(ref)
    assert await ray_manager.lookup("a") == ref
    assert await ref.state() == {"count": 12}
    await ray_manager.stop("a")
    assert not ref.alive and ref.stop_reason is keyhive.StopReason.STOPPED
    with pytest.raises(keyhive.AgentStopped):
        await ref.call("incr")
    with pytest.raises(keyhive.NotFound):
        await ray_manager.stop("a")
    fresh = await ray_manager.get("a")
    assert fresh != ref and fresh.alive
    assert await fresh.call("get") == 0  # storage off: a fresh start


async def test_partitions_are_separate_agents(ray_manager: RayManager) -> None:
    """The same key in two partitions is two agents, and lookup without a partition sees neither."""
    a = await ray_manager.get("k", partition="a")
    b = await ray_manager.get("k", partition="b")
    assert a != b
    await a.call("incr")
    assert (await a.call("get"), await b.call("get")) == (1, 0)
    assert await ray_manager.lookup("k") is None
    stats = await ray_manager.stats(partition="a")
    assert (stats.count, stats.keys, stats.total) == (1, ["k"], 2)


async def test_errors_cross_processes(ray_manager: RayManager) -> None:
    """A handler's exception is re-raised as its own type (or RemoteError) and the agent keeps running."""
    ref = await ray_manager.get("e")
    with pytest.raises(Boom, match="boom from the handler") as info:
        await ref.call("boom")
    assert info.value.code == 7 and info.value.args == ("boom from the handler",)
    assert any("shard host" in note for note in info.value.__notes__)
    with pytest.raises(RemoteError, match="Unrebuildable: 1\\+2") as remote:
        await ray_manager.call("e", "unrebuildable")
    assert remote.value.type_name == "tests.ray.agents.Counter.handle.<locals>.Unrebuildable"
    with pytest.raises(keyhive.NotFound, match="no live agent") as missing:  # keyhive errors exactly
        await ray_manager.stop("nobody")
    assert type(missing.value) is keyhive.NotFound
    assert await ref.call("incr") == 1
    with pytest.raises(TypeError, match="key must be str"):
        await ray_manager.get(1.5)


async def test_unencodable_message_fails_before_sending(ray_manager: RayManager) -> None:
    """A message the codec cannot encode raises CodecError in the caller, and nothing is started."""
    with pytest.raises(keyhive.CodecError):
        await ray_manager.call("never", {1, 2})
    with pytest.raises(keyhive.CodecError):
        await ray_manager.get("never", initial_state={"s": {1}})
    assert await ray_manager.lookup("never") is None
    with pytest.raises(keyhive.CodecError):  # an unencodable reply also reaches the caller as CodecError
        await ray_manager.call("other", "bad-reply")


async def test_timeout_and_slow_turns(ray_manager: RayManager) -> None:
    """A slow turn times out in its caller (TimeoutError) and does not hold up the rest of its batch."""
    slow = asyncio.ensure_future(ray_manager.call("slow", {"sleep": 1.0}, timeout=5))
    await asyncio.sleep(0.05)
    start = time.monotonic()
    fast = await asyncio.gather(*(ray_manager.call(f"f{i}", "incr") for i in range(50)))
    assert fast == [1] * 50 and time.monotonic() - start < 0.9
    assert not slow.done()
    assert await slow == 1
    with pytest.raises(TimeoutError):
        await ray_manager.call("slow", {"sleep": 2.0}, timeout=0.2)


async def test_attach_stats_and_agents(ray_manager: RayManager) -> None:
    """attach counts in stats across shards until the block ends; agents() lists every live agent."""
    for i in range(10):
        await ray_manager.call(f"s{i}", "incr")
    async with ray_manager.attach("s3") as ref:
        stats = await ray_manager.stats()
        assert (stats.count, stats.total, stats.attached) == (10, 10, 1)
        assert sorted(stats.keys) == sorted(f"s{i}" for i in range(10))
        refs = {r.key: r for r in await ray_manager.agents()}
        assert refs["s3"] == ref and refs["s3"].attachments == 1 and refs["s1"].attachments == 0
    assert (await ray_manager.stats()).attached == 0
    # an owner task that finishes is detached
    ref = await ray_manager.get("s5")

    async def owner() -> None:
        await ref.attach()

    await asyncio.create_task(owner())
    deadline = time.monotonic() + 5
    while (await ray_manager.stats()).attached and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (await ray_manager.stats()).attached == 0


async def test_idle_timeout_runs_on_the_host(make_ray_manager: Any) -> None:
    """idle_timeout passes through to the shard hosts: agents() shows the deadline, the agent stops, wait_stopped says so."""
    manager = make_ray_manager(idle_timeout=0.5)
    async with manager:
        try:
            ref = await manager.get("idle")
            listed = await manager.agents()
            now = asyncio.get_running_loop().time()
            assert listed == [ref] and listed[0].idle_deadline is not None
            assert now < listed[0].idle_deadline <= now + 0.5 + 0.02  # this loop's time; deadlines round up to timer_resolution
            assert await asyncio.wait_for(ref.wait_stopped(), 10) is keyhive.StopReason.IDLE_TIMEOUT
            assert not ref.alive
        finally:
            await manager.shutdown_hosts()


async def test_renewal_reports_stopped_incarnations(make_ray_manager: Any) -> None:
    """A ref nobody calls learns from the owner-renewal round trip that its incarnation stopped."""
    manager = make_ray_manager(idle_timeout=0.3, owner_ttl=0.6)
    async with manager:
        try:
            ref = await manager.get("quiet")
            deadline = time.monotonic() + 5
            while ref.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # no call through the ref: only renewals can tell
            assert ref.stop_reason is keyhive.StopReason.IDLE_TIMEOUT
        finally:
            await manager.shutdown_hosts()


async def test_subscribe_gets_host_events(ray_manager: RayManager) -> None:
    """subscribe delivers the shard hosts' lifecycle events (polled), and unsubscribe ends them."""
    events: list[keyhive.Event] = []
    unsubscribe = ray_manager.subscribe(events.append)
    await asyncio.sleep(0.6)  # the first poll sets the cursors
    await ray_manager.get("ev")
    await ray_manager.stop("ev")
    deadline = time.monotonic() + 5
    while len(events) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [(e.kind, e.key, e.manager) for e in events] == [
        (keyhive.EventKind.STARTED, "ev", ray_manager.name), (keyhive.EventKind.STOPPED, "ev", ray_manager.name)]
    assert events[1].reason is keyhive.StopReason.STOPPED
    unsubscribe()
    await ray_manager.get("ev2")
    await asyncio.sleep(0.6)
    assert len(events) == 2
    with pytest.raises(TypeError):
        ray_manager.subscribe(None)  # type: ignore[arg-type]


async def test_cast_touch_detach(ray_manager: RayManager) -> None:
    """cast queues on the host; touch and a detach of an owner that never attached are harmless."""
    ref = await ray_manager.get("c")
    await ref.cast("incr")
    await ref.cast("incr")
    assert await ref.call("get") == 2
    with pytest.raises(keyhive.CodecError):
        await ref.cast({1})
    ref.touch()
    await ref.detach(object())  # never attached: nothing happens
    owner = object()
    await ref.attach(owner)
    await ref.attach(owner)  # idempotent per owner
    assert (await ray_manager.stats()).attached == 1
    await ref.detach(owner)
    assert (await ray_manager.stats()).attached == 0


async def test_closed_manager_refuses(make_ray_manager: Any) -> None:
    """A Ray manager that is not running raises ManagerClosed, and a same-named one is refused."""
    manager = make_ray_manager()
    with pytest.raises(keyhive.ManagerClosed):
        await manager.get("a")
    async with manager:
        twin = make_ray_manager(name=manager.name)
        with pytest.raises(ValueError, match="already running"):
            await twin.start()
        await manager.shutdown_hosts()
    with pytest.raises(keyhive.ManagerClosed):
        await manager.call("a", "incr")


def _lines(proc: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def test_two_processes_hammer_one_key(ray_cluster: Any, make_ray_manager: Any,
                                            tmp_path: Path) -> None:
    """Two client processes increment one key: every reply is distinct, they form 1..N, and N is stored."""
    manager = make_ray_manager(storage=f"sqlite:///{tmp_path / 'h.db'}")
    async with manager:
        try:
            callers, calls = 50, 40
            procs = [ray_cluster.run_client("hammer", manager.name, "hot", str(callers), str(calls))
                     for _ in range(2)]
            replies = [r for p in procs for r in (await asyncio.to_thread(_lines, p, 120))[0]["replies"]]
            total = 2 * callers * calls
            assert sorted(replies) == list(range(1, total + 1))
            await manager.stop("hot")  # the durable point: the checkpoint is written
            storage = keyhive.storage.from_url(f"sqlite:///{tmp_path / 'h.db'}")
            try:
                checkpoint = await storage.load(keyhive._keys.storage_key(manager.name, None, "hot"))
            finally:
                await storage.aclose()
            assert checkpoint is not None
            payload = keyhive.codecs.unpack(checkpoint.data).payload
            assert json.loads(payload) == {"count": total}
        finally:
            await manager.shutdown_hosts()


async def test_shard_host_killed_mid_traffic(make_ray_manager: Any, tmp_path: Path) -> None:
    """A killed shard host fails its in-flight calls with AgentStopped, the next get thaws, nothing saved is lost."""
    import ray

    # checkpoint="turn" makes every acknowledged call durable; where this keyhive does not
    # have it yet, manager.stop() after the calls is the durable point.
    per_turn = "checkpoint" in inspect.signature(keyhive.InstanceManager.__init__).parameters
    extra = {"checkpoint": "turn"} if per_turn else {}
    manager = make_ray_manager(storage=f"sqlite:///{tmp_path / 'k.db'}", shards=1, **extra)
    async with manager:
        try:
            ref = await manager.get("acct")
            for _ in range(5):
                await ref.call("incr")
            if not per_turn:
                await manager.stop("acct")
                ref = await manager.get("acct")
            in_flight = [asyncio.ensure_future(ref.call({"sleep": 3.0}, timeout=20)) for _ in range(3)]
            in_flight.append(asyncio.ensure_future(manager.call("acct", {"sleep": 3.0}, timeout=20)))
            await asyncio.sleep(0.5)
            killed = time.monotonic()
            ray.kill(manager._shards[0].handle, no_restart=False)
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            assert all(isinstance(r, keyhive.AgentStopped) for r in results), results
            assert not ref.alive and ref.stop_reason is keyhive.StopReason.LEASE_LOST
            with pytest.raises(keyhive.AgentStopped):
                await ref.call("incr")
            again = await manager.get("acct")
            assert await again.call("get") == 5  # thawed from the last checkpoint
            assert time.monotonic() - killed < 3.0, "shard kill to first successful call took over 3 s"
            assert again != ref
        finally:
            await manager.shutdown_hosts()


async def test_killed_client_attachment_expires(ray_cluster: Any, make_ray_manager: Any) -> None:
    """A client process SIGKILLed while attached loses its attachment within owner_ttl."""
    manager = make_ray_manager()
    async with manager:
        try:
            proc = ray_cluster.run_client("attach", manager.name, "held", "1.5")
            try:
                line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
                assert json.loads(line) == {"attached": True}
                assert (await manager.stats()).attached == 1
                await asyncio.sleep(2.0)  # renewals keep it past one ttl
                assert (await manager.stats()).attached == 1
                proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
            finally:
                proc.kill()
                await asyncio.to_thread(proc.communicate)
            while (await manager.stats()).attached and time.monotonic() - killed < 5:
                await asyncio.sleep(0.05)
            assert (await manager.stats()).attached == 0
            assert time.monotonic() - killed < 1.5 + 0.5
        finally:
            await manager.shutdown_hosts()


async def test_two_workers_serve_the_same_agents(ray_cluster: Any, make_ray_manager: Any) -> None:
    """Two worker processes building the same manager reach the same incarnations: one live agent per key."""
    manager = make_ray_manager()
    async with manager:
        try:
            procs = [ray_cluster.run_client("serve", manager.name, "20") for _ in range(2)]
            seen = [await asyncio.to_thread(_lines, p, 120) for p in procs]
            first = {row["key"]: (row["pid"], row["inc"]) for row in seen[0]}
            second = {row["key"]: (row["pid"], row["inc"]) for row in seen[1]}
            assert first == second and len(first) == 20
            assert len({pid for pid, _ in first.values()}) == 2  # two shard hosts share the keys
            stats = await manager.stats()
            assert stats.total == 20
        finally:
            await manager.shutdown_hosts()

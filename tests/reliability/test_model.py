"""Model-based test of the lifecycle: random interleavings checked against a reference model.

A Hypothesis ``RuleBasedStateMachine`` drives one real ``InstanceManager`` and a tiny
reference model side by side, and checks after every step that they agree.

Time: the machine owns a ``looptime`` event loop (``looptime.new_event_loop()``), the
same time-compacting loop the pytest plugin uses. Each rule runs one coroutine on it
with ``run_until_complete`` and then *settles* the loop (spins ``sleep(0)`` until no
manager task, cast or storage call is under way), which never moves the clock. Only the
``advance`` rule moves time, by sleeping to a whole second: the loop jumps from timer to
timer, so idle deadlines and hibernate retries fire exactly as they would in real time,
in microseconds. The idle timeout (10.37 s) and retry backoff (0.71 s) are chosen so that
no deadline lands on a whole second, so the model never has to guess which of two
events came first.

The model keeps, per key: live or not, the value of the counter (every acknowledged
``incr`` adds one), the value stored in the last checkpoint, the owners attached, the
idle deadline (a time, ``None`` while attached, or ``RETRY`` after a failed hibernate)
and whether a self-stop is pending. Invariants: never two live incarnations of a key; a
thaw returns the last acknowledged state; a failed write never drops an agent;
``stats()`` and every live ref agree with the model; the storage holds exactly what
the model says was saved.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import looptime
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import keyhive
from keyhive._keys import storage_key
from keyhive.codecs import unpack
from keyhive.storage.sqlite import SQLiteStorage
from keyhive.testing import FaultyStorage

from .conftest import scaled

T = 10.37
BACKOFF = 0.71
CLOSE_TIMEOUT = 2.0
KEYS = ["a", "b", ("t", 1), b"\x00k"]
OWNERS = 3
RETRY = "retry"
NAME = "model"


class Tally(keyhive.Agent):
    """A counter: ``incr`` adds one, ``boom`` raises, ``stop`` stops the agent."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"n": 0}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["n"] += 1
        elif message == "boom":
            raise RuntimeError("boom")
        elif message == "stop":
            self.stop()
        return self.state["n"]


@dataclass
class KeyModel:
    live: bool = False
    value: int = 0
    stored: int | None = None  # None: no checkpoint
    stored_known: bool = True
    owners: set[int] = field(default_factory=set)
    deadline: float | str | None = None
    self_stop: bool = False
    ref: keyhive.AgentRef | None = None
    reasons: frozenset[keyhive.StopReason] = frozenset()
    unsure: bool = False  # a write of this incarnation may have landed (lost reply)
    dirty: bool = False  # a turn ran in this incarnation since it started
    acked: int | None = None  # the value this incarnation thawed or last wrote (SPEC §9: unchanged
    # state writes nothing, so a stop with nothing new to write succeeds with storage down)


class _Owner:
    """An owner task that attaches and detaches on command, and can finish."""

    def __init__(self, machine: LifecycleMachine) -> None:
        self.machine = machine
        self.queue: asyncio.Queue[tuple[str, Any, asyncio.Future[Any]]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            cmd, key, reply = await self.queue.get()
            if cmd == "finish":
                reply.set_result(None)
                return
            try:
                mgr = self.machine.mgr
                if cmd == "attach":
                    ref = await mgr.get(key)
                    await ref.attach()
                else:
                    ref = await mgr.lookup(key)
                    if ref is not None:
                        await ref.detach()
                reply.set_result(ref)
            except Exception as exc:
                reply.set_exception(exc)

    async def send(self, cmd: str, key: Any = None) -> Any:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((cmd, key, reply))
        return await reply


class LifecycleMachine(RuleBasedStateMachine):
    backend = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.loop = looptime.new_event_loop()
        self.tmp: str | None = None
        if self.backend == "sqlite":
            self.tmp = tempfile.mkdtemp(prefix="keyhive-model-")
            inner: Any = SQLiteStorage(f"{self.tmp}/model.db")
        else:
            inner = keyhive.MemoryStorage()
        self.storage = FaultyStorage(inner)
        self.inner = inner
        self.mgr: keyhive.InstanceManager = None  # type: ignore[assignment]
        self.closed = True
        self.model = {k: KeyModel() for k in KEYS}
        self.refs: dict[Any, list[keyhive.AgentRef]] = {k: [] for k in KEYS}
        self.owners: dict[int, _Owner] = {}
        self.load_ok = True
        self.save_ok = True
        self.lost = False  # saves fail as far as the manager can tell, but land (lost replies)
        self.now = 0.0

    # -- plumbing -----------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def attempt(self, coro: Any) -> tuple[Any, BaseException | None]:
        async def wrapped() -> tuple[Any, BaseException | None]:
            try:
                return await coro, None
            except Exception as exc:
                return None, exc
            finally:
                await self._settle()

        result: tuple[Any, BaseException | None] = self.run(wrapped())
        self.now = self.loop.time()
        return result

    def _busy(self) -> bool:
        if self.storage.in_flight:
            return True
        m = self.mgr
        if m is None:
            return False
        return m._core.reaper.task is not None or m._closer is not None or any(not t.done() for t in m._core.tasks)

    async def _settle(self) -> None:
        quiet = 0
        for _ in range(200_000):
            await asyncio.sleep(0)
            quiet = 0 if self._busy() else quiet + 1
            if quiet >= 8:
                return
        raise AssertionError("the manager never settled")

    def _new_manager(self) -> keyhive.InstanceManager:
        return keyhive.InstanceManager(
            NAME, Tally, idle_timeout=T, storage=self.storage, retry_backoff=(BACKOFF, BACKOFF),
            close_timeout=CLOSE_TIMEOUT, registry_partitions=2,
        )

    def _stopped(self, key: Any, *reasons: keyhive.StopReason, saved: bool = True,
                 landed: bool = False) -> None:
        km = self.model[key]
        km.live = False
        km.owners.clear()
        km.deadline = None
        km.self_stop = False
        km.reasons = frozenset(reasons)
        if not self._needs_write(key):
            # nothing new to write: the stored checkpoint (or its absence) stands
            if not km.stored_known:  # an earlier write may have landed, its reply lost
                km.stored, km.stored_known = self._read_stored(key), True
        elif saved or landed:  # with lost replies, an unsaved write of close may have landed
            km.stored = km.value
            km.stored_known = True
        else:  # the documented loss, reported by close: what is stored is what thaws
            if not km.stored_known:  # an earlier write landed, its reply lost
                km.stored, km.stored_known = self._read_stored(key), True
            km.value = km.stored or 0
        km.unsure = False
        assert km.ref is not None
        self.refs[key].append(km.ref)

    def _started(self, key: Any, ref: keyhive.AgentRef) -> None:
        km = self.model[key]
        km.live = True
        assert km.stored_known, km
        km.value = km.stored or 0
        km.stored_known = not self.lost
        km.unsure = False
        km.dirty = False
        km.acked = km.stored
        km.owners = set()
        km.deadline = self.now + T
        km.self_stop = False
        km.ref = ref

    def _needs_write(self, key: Any) -> bool:
        """Whether a hibernate of ``key`` has anything to write: a turn ran and the value is
        not the one this incarnation thawed or last wrote."""
        km = self.model[key]
        return km.dirty and not (km.acked is not None and km.value == km.acked)

    def _saves(self, key: Any) -> bool:
        """Whether a hibernate of ``key`` succeeds now.

        With nothing to write it always does. After a write whose reply was lost, the
        next write conflicts with it and the manager must load the checkpoint to recognise
        it as its own: that needs loads too.
        """
        if not self._needs_write(key):
            return True
        return self.save_ok and (self.load_ok or not self.model[key].unsure)

    def _tried(self, key: Any) -> None:
        """A hibernate of live ``key`` was tried and failed; with lost replies, it landed."""
        if self.lost:
            self.model[key].unsure = True

    def _get_outcome(self, key: Any, ref: Any, exc: BaseException | None) -> None:
        """Check and apply the outcome of a get (or of the get inside call/attach)."""
        km = self.model[key]
        if self.closed:
            assert isinstance(exc, keyhive.ManagerClosed), exc
            return
        if km.live:
            assert exc is None or not isinstance(exc, keyhive.ThawError | keyhive.ManagerClosed), exc
            if ref is not None:
                assert ref is km.ref
            return
        if not self.load_ok:
            assert isinstance(exc, keyhive.ThawError), exc
            assert isinstance(exc.__cause__, Exception)
            return
        assert not isinstance(exc, keyhive.ThawError | keyhive.ManagerClosed), exc
        live = ref if ref is not None else self.run(self.mgr.lookup(key))
        assert live is not None
        self._started(key, live)

    # -- rules ---------------------------------------------------------------------------------

    @initialize()
    def open_first(self) -> None:
        self.reopen()

    @precondition(lambda self: self.closed)
    @rule()
    def reopen(self) -> None:
        async def start() -> None:
            # whole seconds again after a close that slept through its retries
            now = asyncio.get_running_loop().time()
            await asyncio.sleep(math.ceil(now) - now)
            self.mgr = self._new_manager()
            await self.mgr.start()

        self.run(start())
        self.now = self.loop.time()
        self.closed = False

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: Any) -> None:
        ref, exc = self.attempt(self.mgr.get(key))
        self._get_outcome(key, ref, exc)
        if exc is None:
            state = self.run(ref.state())
            assert state == {"n": self.model[key].value}, (state, self.model[key])

    @rule(key=st.sampled_from(KEYS))
    def lookup(self, key: Any) -> None:
        ref, exc = self.attempt(self.mgr.lookup(key))
        if self.closed:
            assert isinstance(exc, keyhive.ManagerClosed)
            return
        assert exc is None
        assert ref is self.model[key].ref if self.model[key].live else ref is None

    def _send(self, key: Any, how: str, message: str) -> tuple[Any, BaseException | None]:
        """get (checked against the model), then call or cast; returns the send's outcome."""
        out: dict[str, Any] = {}

        async def go() -> Any:
            out["ref"] = await self.mgr.get(key)
            if how == "cast":
                return await out["ref"].cast(message)
            return await out["ref"].call(message)

        result, exc = self.attempt(go())
        if "ref" not in out:
            self._get_outcome(key, None, exc)
            return None, exc if exc is not None else AssertionError("no ref")
        self._get_outcome(key, out["ref"], None)
        return result, exc

    @rule(key=st.sampled_from(KEYS), message=st.sampled_from(["incr", "incr", "boom", "get"]),
          via_manager=st.booleans())
    def call(self, key: Any, message: str, via_manager: bool) -> None:
        if via_manager:  # manager.call: get + call in one
            before = self.model[key].live
            result, exc = self.attempt(self.mgr.call(key, message))
            self._get_outcome(key, None, exc)
            if self.closed or (not before and not self.load_ok):
                return
        else:
            result, exc = self._send(key, "call", message)
            if isinstance(exc, keyhive.KeyhiveError):
                return
        km = self.model[key]
        km.dirty = True  # the message was handled: a turn ran
        if message == "boom":
            assert isinstance(exc, RuntimeError), exc
            return
        assert exc is None, exc
        if message == "incr":
            km.value += 1
        assert result == km.value, (result, km)

    @rule(key=st.sampled_from(KEYS))
    def cast(self, key: Any) -> None:
        _, exc = self._send(key, "cast", "incr")
        if isinstance(exc, keyhive.KeyhiveError):
            return
        assert exc is None, exc
        self.model[key].value += 1
        self.model[key].dirty = True

    @rule(key=st.sampled_from(KEYS))
    def self_stop(self, key: Any) -> None:
        result, exc = self._send(key, "call", "stop")
        if isinstance(exc, keyhive.KeyhiveError):
            return
        assert exc is None, exc
        km = self.model[key]
        km.dirty = True
        assert result == km.value
        if self._saves(key):  # also while a failed self-stop waits for its retry: asked again, it tries now
            self._stopped(key, keyhive.StopReason.NORMAL)
        else:
            self._tried(key)
            km.self_stop = True

    @rule(key=st.sampled_from(KEYS), owner=st.integers(0, OWNERS - 1))
    def attach(self, key: Any, owner: int) -> None:
        async def go() -> Any:
            if owner not in self.owners:
                self.owners[owner] = _Owner(self)
            return await self.owners[owner].send("attach", key)

        ref, exc = self.attempt(go())
        self._get_outcome(key, ref, exc)
        if exc is None:
            km = self.model[key]
            km.owners.add(owner)
            km.deadline = None

    def _detached(self, key: Any, owner: int) -> None:
        km = self.model[key]
        if km.live and owner in km.owners:
            km.owners.discard(owner)
            if not km.owners:
                km.deadline = self.now + T

    @rule(key=st.sampled_from(KEYS), owner=st.integers(0, OWNERS - 1))
    def detach(self, key: Any, owner: int) -> None:
        if owner not in self.owners:
            return
        _, exc = self.attempt(self.owners[owner].send("detach", key))
        if self.closed:
            assert isinstance(exc, keyhive.ManagerClosed)
            return
        assert exc is None, exc
        self._detached(key, owner)

    @rule(owner=st.integers(0, OWNERS - 1))
    def owner_finishes(self, owner: int) -> None:
        if owner not in self.owners:
            return
        entry = self.owners.pop(owner)

        async def go() -> None:
            await entry.send("finish")
            await entry.task

        self.attempt(go())
        for key in KEYS:
            self._detached(key, owner)

    @rule(key=st.sampled_from(KEYS))
    def touch(self, key: Any) -> None:
        km = self.model[key]
        if self.closed or not km.live:
            return
        assert km.ref is not None
        km.ref.touch()
        if not km.owners:
            km.deadline = self.now + T

    @rule(key=st.sampled_from(KEYS))
    def stop(self, key: Any) -> None:
        _, exc = self.attempt(self.mgr.stop(key))
        km = self.model[key]
        if self.closed:
            assert isinstance(exc, keyhive.ManagerClosed)
        elif not km.live:
            assert isinstance(exc, keyhive.NotFound), exc
        elif self._saves(key):
            assert exc is None, exc
            self._stopped(key, keyhive.StopReason.STOPPED)
        else:
            self._tried(key)
            assert isinstance(exc, keyhive.StorageError), exc
            assert isinstance(exc.__cause__, Exception)

    @rule(load_ok=st.booleans(), save_ok=st.booleans(), lost=st.booleans())
    def storage_health(self, load_ok: bool, save_ok: bool, lost: bool = False) -> None:
        """Storage up or down; a failing save either writes nothing or (``lost``) lands
        and loses its reply, which the manager cannot tell apart."""
        self.load_ok, self.save_ok = load_ok, save_ok
        self.lost = lost and not save_ok
        self.storage.fail_load = not load_ok
        self.storage.fail_save = not save_ok and not self.lost
        self.storage.lost_replies = self.lost
        if self.lost:  # any write from now on may land: the stored value is known again on a stop
            for km in self.model.values():
                if km.live:
                    km.stored_known = False

    @rule(dt=st.sampled_from([1, 2, 5, 9, 11, 30]))
    def advance(self, dt: int) -> None:
        target = round(self.now) + dt

        async def go() -> None:
            await asyncio.sleep(target - asyncio.get_running_loop().time())

        self.attempt(go())
        if self.closed:
            return
        idle, normal = keyhive.StopReason.IDLE_TIMEOUT, keyhive.StopReason.NORMAL
        for key, km in self.model.items():
            if not km.live:
                continue
            due = not km.owners and (km.deadline == RETRY or (
                isinstance(km.deadline, float) and km.deadline < target))
            ok = self._saves(key)
            if km.self_stop and ok:
                self._stopped(key, normal, idle)
            elif due and ok:
                self._stopped(key, idle)
            elif due or km.self_stop:
                self._tried(key)
                if due:
                    km.deadline = RETRY

    @precondition(lambda self: not self.closed)
    @rule(key=st.sampled_from(KEYS))
    def race(self, key: Any) -> None:
        """stop, call and get of one key at once, with storage healthy."""
        if not (self.load_ok and self.save_ok):
            return
        km = self.model[key]
        before = km.ref if km.live else None
        value = km.value
        # the stop may run first; with nothing new to write it leaves the checkpoint as it was
        first = km.stored if before is not None and not self._needs_write(key) else value

        async def go() -> list[Any]:
            return await asyncio.gather(self.mgr.stop(key), self.mgr.call(key, "incr"),
                                        self.mgr.get(key), return_exceptions=True)

        (stopped, called, got), _ = self.attempt(go())
        assert stopped is None or isinstance(stopped, keyhive.NotFound), stopped
        assert isinstance(called, int), called
        assert isinstance(got, keyhive.AgentRef), got
        km.value += 1
        assert called == km.value, (called, km)
        now_ref = self.run(self.mgr.lookup(key))
        assert now_ref is not None
        if before is not None and before is not now_ref:
            assert not before.alive
            assert before.stop_reason is keyhive.StopReason.STOPPED
            self.refs[key].append(before)
        if now_ref is not before and before is not None:
            stored = self._read_stored(key)
            assert stored in (first, value + 1), (stored, first, value)
            km.stored, km.stored_known = stored, True
        if now_ref is not before:
            keep = km.value
            self._started(key, now_ref)
            km.value = keep
        km.dirty = True  # the incr ran in the incarnation live now, or before its thaw

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        _, exc = self.attempt(self.mgr.close())
        live = [k for k, km in self.model.items() if km.live]
        unsaved = [k for k in live if not self._saves(k)]
        if not unsaved:
            assert exc is None, exc
        else:
            assert isinstance(exc, keyhive.UnsavedAgentsError), exc
            assert sorted(map(repr, exc.keys)) == sorted(repr((None, k)) for k in unsaved)
        for key in live:
            if key in unsaved:
                # with lost replies a write lands, unless an earlier one did and loads are
                # down (then every write conflicts and cannot be recognised)
                landed = self.lost and (self.load_ok or not self.model[key].unsure)
                self._tried(key)
                self._stopped(key, keyhive.StopReason.UNSAVED, saved=False, landed=landed)
            else:
                self._stopped(key, keyhive.StopReason.SHUTDOWN)
        for owner in self.owners.values():
            self.run(owner.send("finish"))
        self.owners.clear()
        self.closed = True

    # -- invariants ------------------------------------------------------------------------------

    def _read_stored(self, key: Any) -> int | None:
        cp = self.run(self.inner.load(storage_key(NAME, None, key)))
        if cp is None:
            return None
        payload = unpack(cp.data).payload
        import orjson

        n: int = orjson.loads(payload)["n"]
        return n

    @invariant()
    def agrees_with_the_model(self) -> None:
        for key, km in self.model.items():
            # never two live incarnations: every ref handed out before has stopped
            for old in self.refs[key]:
                assert not old.alive, old
            if km.stored_known:
                assert self._read_stored(key) == km.stored, (key, km)
        if self.closed:
            return
        stats = self.run(self.mgr.stats())
        live = {repr(k) for k, km in self.model.items() if km.live}
        assert {repr(k) for k in stats.keys} == live, (stats.keys, self.model)
        assert stats.count == len(live)
        assert stats.attached == sum(1 for km in self.model.values() if km.live and km.owners)
        for key, km in self.model.items():
            ref = self.run(self.mgr.lookup(key))
            if not km.live:
                assert ref is None, (key, ref, km)
                if km.ref is not None:
                    assert not km.ref.alive
                    assert km.ref.stop_reason in km.reasons, (km.ref.stop_reason, km.reasons)
                continue
            assert ref is km.ref and ref.alive, (key, ref, km)
            assert ref.attachments == len(km.owners), (key, ref.attachments, km)
            if km.deadline is None:
                assert ref.idle_deadline is None, (key, ref.idle_deadline, km)
            elif km.deadline == RETRY:
                assert ref.idle_deadline is not None
            else:
                assert ref.idle_deadline is not None
                assert abs(ref.idle_deadline - km.deadline) < 0.2, (key, ref.idle_deadline, km)
            state = self.run(ref.state())
            assert state == {"n": km.value}, (key, state, km)

    def teardown(self) -> None:
        try:
            self.storage.heal()
            if not self.closed:
                self.run(self.mgr.close())
            for owner in self.owners.values():
                self.run(owner.send("finish"))
            self.run(self.storage.aclose())
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            assert not pending, pending
        finally:
            self.loop.close()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)


class SQLiteLifecycleMachine(LifecycleMachine):
    backend = "sqlite"


_budget = pytest.mark.timeout(0 if scaled(1) > 1 else 300)  # the soak profile runs as long as it needs
TestLifecycleOnMemory = _budget(LifecycleMachine.TestCase)
TestLifecycleOnMemory.settings = settings(settings.default, max_examples=scaled(200))
TestLifecycleOnSQLite = _budget(SQLiteLifecycleMachine.TestCase)
TestLifecycleOnSQLite.settings = settings(settings.default, max_examples=scaled(40))


# -- shrunk counter-examples found by the machine, kept as regression tests --------------------------


def _replay(machine_cls: type[LifecycleMachine], steps: list[tuple[str, dict[str, Any]]]) -> None:
    state = machine_cls()
    try:
        state.open_first()
        state.agrees_with_the_model()
        for name, kwargs in steps:
            getattr(state, name)(**kwargs)
            state.agrees_with_the_model()
    finally:
        state.teardown()


def test_idle_retry_chain_is_not_dropped_when_a_slot_fires_a_hair_early() -> None:
    """A hibernate retry whose slot fires a float-rounding hair before the deadline still hibernates.

    Found by the model: the wheel judged the agent due (slot time) but the reaper re-checked
    with the loop clock, found it not due, and dropped it without re-arming, so the agent
    never idled out again once storage came back.
    """
    _replay(LifecycleMachine, [
        ("cast", {"key": "a"}),
        ("storage_health", {"load_ok": False, "save_ok": False}),
        ("advance", {"dt": 30}),
        ("advance", {"dt": 1}),
        ("storage_health", {"load_ok": False, "save_ok": True}),
        ("advance", {"dt": 1}),
    ])


def test_self_stop_works_after_an_earlier_failed_hibernate() -> None:
    """An agent whose idle hibernate once failed can still stop itself once storage is back.

    Found by the model: ``_release`` only began a self-stop while the incarnation had
    never failed a hibernate (``_failures == 0``), so after one storage outage
    ``self.stop()`` was silently ignored for the rest of the incarnation's life.
    """
    _replay(LifecycleMachine, [
        ("get", {"key": "a"}),
        ("storage_health", {"load_ok": False, "save_ok": False}),
        ("advance", {"dt": 11}),
        ("storage_health", {"load_ok": False, "save_ok": True}),
        ("self_stop", {"key": "a"}),
    ])


def test_self_stop_after_a_failed_stop_while_attached() -> None:
    """A failed manager.stop() does not disable the agent's own stop later."""
    _replay(LifecycleMachine, [
        ("attach", {"key": "a", "owner": 0}),
        ("storage_health", {"load_ok": True, "save_ok": False}),
        ("stop", {"key": "a"}),
        ("storage_health", {"load_ok": True, "save_ok": True}),
        ("self_stop", {"key": "a"}),
    ])


def test_lost_reply_then_recovery_keeps_the_state_acknowledged_since() -> None:
    """A self-stop whose write landed but whose reply was lost; later calls are not dropped.

    Found by the model once it could lose replies: the retry conflicted with the
    agent's own landed write, the agent stopped with CONFLICT and its later increments
    were gone.
    """
    _replay(LifecycleMachine, [
        ("call", {"key": "a", "message": "incr", "via_manager": True}),
        ("storage_health", {"load_ok": True, "save_ok": False, "lost": True}),
        ("self_stop", {"key": "a"}),
        ("call", {"key": "a", "message": "incr", "via_manager": False}),
        ("storage_health", {"load_ok": True, "save_ok": True, "lost": False}),
        ("advance", {"dt": 1}),
        ("get", {"key": "a"}),
    ])


def test_recovering_from_a_lost_reply_needs_loads_and_waits_for_them() -> None:
    """After a lost reply, recognising the landed write needs a load: with loads down the
    agent stays alive and close names it, instead of overwriting or dropping anything.

    Found by the model (the model had assumed saves alone were enough).
    """
    _replay(LifecycleMachine, [
        ("storage_health", {"load_ok": True, "save_ok": False, "lost": True}),
        ("self_stop", {"key": "a"}),
        ("storage_health", {"load_ok": False, "save_ok": True, "lost": False}),
        ("advance", {"dt": 1}),
        ("close", {}),
        ("storage_health", {"load_ok": True, "save_ok": True, "lost": False}),
        ("reopen", {}),
        ("get", {"key": "a"}),
    ])


def test_close_with_loads_down_after_a_lost_reply_leaves_the_landed_write() -> None:
    """Close cannot recognise an earlier landed write with loads down: it reports the key
    unsaved and leaves the older landed checkpoint as it is (found by the model's soak
    profile; the model had assumed close's own write landed)."""
    _replay(LifecycleMachine, [
        ("close", {}),
        ("storage_health", {"load_ok": True, "save_ok": False, "lost": True}),
        ("reopen", {}),
        ("cast", {"key": "a"}),
        ("advance", {"dt": 11}),
        ("cast", {"key": "a"}),
        ("storage_health", {"load_ok": False, "save_ok": False, "lost": True}),
        ("close", {}),
    ])


def test_a_race_restart_does_not_inherit_the_old_incarnations_lost_reply() -> None:
    """The model's soak profile: a lost reply of one incarnation says nothing about the
    next one, which stops fine with loads down (the model had carried the flag over)."""
    _replay(LifecycleMachine, [
        ("storage_health", {"load_ok": True, "save_ok": False, "lost": True}),
        ("self_stop", {"key": ("t", 1)}),
        ("storage_health", {"load_ok": True, "save_ok": True, "lost": False}),
        ("race", {"key": ("t", 1)}),
        ("storage_health", {"load_ok": False, "save_ok": True, "lost": False}),
        ("stop", {"key": ("t", 1)}),
    ])

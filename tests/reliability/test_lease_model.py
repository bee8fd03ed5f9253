"""Model-based test of the lease protocol (SPEC §10) under clock skew, pauses and lost replies.

A Hypothesis ``RuleBasedStateMachine`` drives the manager's real
:class:`keyhive._lease.LeaseKeeper` in three clients against one fake lease storage.

The storage (:class:`FakeLeaseStorage`) implements ``acquire_lease``/``release_lease``/
``read_lease`` and fenced compare-and-set ``save`` exactly as the real backends do
(SQLite's rules, Redis's first epoch): holder, epoch, acquired_at, expiry judged by the
*storage's* clock ``World.now``; a fence lands only on the stored, unreleased epoch; a
missing record refuses every fence; a new record starts at the storage clock in
microseconds (as Redis does, so a storage that lost its data never hands out an old epoch).

Each client runs its keeper on an event loop of its own whose ``time()`` is the client's
monotonic clock: a rate of 0.9x-1.1x of the storage clock and an offset, both drawn per
example. Nothing sleeps for real: ``advance`` moves the storage clock from one client
timer to the next (converted through each client's clock), running that client's loop
until it is idle, and checks the invariants at every such moment. Storage calls take a
drawn latency before and after they apply, on the caller's clock; past
``storage_timeout`` the caller gives up (the call may have applied). A lost reply is
applied by the storage and never heard by the client.

Rules: advance time; a client takes the lease (``acquire(wait=0)``, as a manager's start);
releases it (close); makes a fenced write when it believes it holds the lease, retrying
once after ``retake`` as the checkpoint writer does; makes a write with whatever fence it
still has (a write already on its way when the lease was lost); loses its next reply;
changes its latency; is paused and resumed, either *frozen* (its monotonic clock stops
too, as a suspended VM) or *stopped* (SIGSTOP: the clock runs on, the loop does not); the
storage loses all its data (a Redis restart without persistence).

Invariants, at every storage moment:
- never two clients that both believe they hold the lease (``keeper.held``, by their own
  clock) and whose fence the storage would accept;
- without a frozen pause or a data loss since a client's last renewal, never two clients
  that believe they hold the lease at all (the ``_MARGIN`` covers ±10% clock rates);
- every write that landed was made under the epoch stored at that moment;
- epochs handed out for the name only grow, across data loss too;
- a client whose epoch was superseded (handed to another, or lost with the data) never
  lands a write with that old fence;
- a client that believes it holds the lease fences with the epoch its keeper holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from keyhive import ConflictError, LeaseLost, OwnedElsewhere, StorageError
from keyhive._lease import _MARGIN, LeaseKeeper
from keyhive.storage import Checkpoint, Fence, Lease

from .conftest import scaled

TTL = 9.0
HELD = TTL * (1 - _MARGIN)
STORAGE_TIMEOUT = 1.0
CLIENTS = 3
NAME = "lmodel"
LEASE = f"{NAME}/*"
KEY = "k"
TICK = 0.001  # every rule but advance takes this long on the storage clock
LATENCIES = [0.0, 0.05, 0.4, 1.5]  # client seconds; 1.5 > STORAGE_TIMEOUT
EPS = 1e-7


class World:
    """The storage's clock, which every client clock is derived from."""

    def __init__(self) -> None:
        self.now = 1000.0


@dataclass
class Record:
    holder: str
    epoch: int
    acquired_at: float
    expires_at: float
    released: bool = False


@dataclass
class Landed:
    at: float
    writer: str
    fence_epoch: int
    stored_epoch: int


class FakeLeaseStorage:
    """Leases and fenced compare-and-set saves, as the real backends keep them (see module doc)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.leases: dict[str, Record] = {}
        self.data: dict[str, Checkpoint] = {}
        self.latency: dict[str, tuple[float, float]] = {}  # holder -> before, after
        self.lose_reply: set[str] = set()
        self.epochs: list[int] = []  # every epoch handed out for LEASE, in order
        self.landed: list[Landed] = []
        self.superseded: dict[str, int] = {}  # holder -> highest epoch of theirs that moved on
        self.violations: list[str] = []
        self.refused = 0

    async def _before(self, who: str) -> None:
        await asyncio.sleep(self.latency.get(who, (0.0, 0.0))[0])

    async def _after(self, who: str) -> None:
        await asyncio.sleep(self.latency.get(who, (0.0, 0.0))[1])
        if who in self.lose_reply:
            self.lose_reply.discard(who)
            raise StorageError(f"reply to {who} lost (the storage applied the call)")

    def _lease(self, name: str, r: Record) -> Lease:
        left = 0.0 if r.released else max(0.0, r.expires_at - self.world.now)
        return Lease(name, r.holder, r.epoch, r.acquired_at, left, r.released)

    def _handed(self, name: str, r: Record) -> None:
        """``r`` just got a new epoch: it must be above every earlier one; older fences are out."""
        if self.epochs and r.epoch <= max(self.epochs):
            self.violations.append(f"epoch {r.epoch} handed out after {max(self.epochs)}")
        self.epochs.append(r.epoch)

    def _supersede(self, below: int) -> None:
        """Every fence under an epoch below ``below`` is out for good, whoever holds it."""
        for holder in self.latency:
            self.superseded[holder] = max(self.superseded.get(holder, -1), below - 1)

    async def acquire_lease(self, name: str, holder: str, ttl: float, *, takeover: bool = False) -> Lease:
        await self._before(holder)
        now = self.world.now
        r = self.leases.get(name)
        if r is None:
            r = self.leases[name] = Record(holder, int(now * 1_000_000), now, now + ttl)
            self._handed(name, r)
            self._supersede(r.epoch)
        elif r.holder == holder and not r.released:
            r.expires_at = now + ttl  # a renewal keeps the epoch, even once expired
        elif r.released or r.expires_at <= now or takeover:
            r.holder, r.epoch, r.acquired_at, r.expires_at, r.released = holder, r.epoch + 1, now, now + ttl, False
            self._handed(name, r)
            self._supersede(r.epoch)
        lease = self._lease(name, r)
        await self._after(holder)
        return lease

    async def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        await self._before(holder)
        r = self.leases.get(name)
        done = r is not None and r.holder == holder and r.epoch == epoch and not r.released
        if done:
            assert r is not None
            r.released, r.expires_at = True, self.world.now
        await self._after(holder)
        return done

    async def read_lease(self, name: str) -> Lease | None:
        r = self.leases.get(name)
        return None if r is None else self._lease(name, r)

    def accepts(self, fence: Fence | None) -> bool:
        """Whether a write under ``fence`` would land now."""
        r = None if fence is None else self.leases.get(fence.name)
        return r is not None and fence is not None and r.epoch == fence.epoch and not r.released

    async def load(self, key: str) -> Checkpoint | None:
        return self.data.get(key)

    async def save(self, key: str, data: bytes, *, expected_version: int | None,
                   fence: Fence | None = None, writer: str = "") -> int:
        await self._before(writer)
        if fence is None:
            self.violations.append(f"{writer} wrote without a fence")
            raise AssertionError("unfenced write")
        if not self.accepts(fence):
            self.refused += 1
            r = self.leases.get(fence.name)
            raise LeaseLost(f"lease {fence.name!r} is no longer held under epoch {fence.epoch} "
                            f"({'no lease' if r is None else f'epoch {r.epoch}'}): nothing was written")
        stored = self.data.get(key)
        if (None if stored is None else stored.version) != expected_version:
            raise ConflictError(f"{key!r}: expected version {expected_version}, stored "
                                f"{None if stored is None else stored.version}")
        version = 1 if stored is None else stored.version + 1
        self.data[key] = Checkpoint(data, version)
        r = self.leases[fence.name]
        self.landed.append(Landed(self.world.now, writer, fence.epoch, r.epoch))
        if fence.epoch != r.epoch:
            self.violations.append(f"{writer} landed under epoch {fence.epoch}, stored {r.epoch}")
        if fence.epoch <= self.superseded.get(writer, -1):
            self.violations.append(f"{writer} landed with superseded epoch {fence.epoch}")
        await self._after(writer)
        return version

    def lose_data(self) -> None:
        """A restart without its data: lease records and checkpoints are gone."""
        self.leases.clear()
        self.data.clear()
        self._supersede(max(self.epochs, default=0) + 1)


class ClientLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is one client's skewed monotonic clock."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def time(self) -> float:
        return self.clock.now()

    def next_timer(self) -> float:
        return min((h.when() for h in self._scheduled if not h.cancelled()), default=math.inf)


@dataclass
class Clock:
    """``base_c + rate * (storage now - base_s)``; frozen while a frozen pause lasts."""

    world: World
    rate: float
    base_c: float
    base_s: float = 0.0
    frozen: bool = False

    def now(self) -> float:
        return self.base_c if self.frozen else self.base_c + self.rate * (self.world.now - self.base_s)

    def freeze(self) -> None:
        self.base_c, self.frozen = self.now(), True

    def thaw(self) -> None:
        self.base_s, self.frozen = self.world.now, False

    def storage_time_of(self, c: float) -> float:
        return math.inf if self.frozen else self.base_s + (c - self.base_c) / self.rate


@dataclass
class Client:
    index: int
    clock: Clock
    loop: ClientLoop
    keeper: LeaseKeeper
    core: Any
    holder: str
    paused: str | None = None  # None, "frozen" or "stopped"
    op: asyncio.Task[None] | None = None
    taint: float | None = None  # client clock: strong exclusion not promised until a renewal after it
    version: int | None = None  # the checkpoint version this client believes is stored
    epochs: list[int] = field(default_factory=list)


def _fake_core(storage: FakeLeaseStorage, writer: str) -> Any:
    """The few parts of a manager's Core that LeaseKeeper uses."""
    core = SimpleNamespace(
        name=NAME,
        options=SimpleNamespace(shard=None, lease_ttl=TTL, storage_timeout=STORAGE_TIMEOUT),
        io=SimpleNamespace(storage=storage, writer=writer, fence=None, retake=None),
        counters=Counter(),
        tasks=set(),
        live_refs=list,
        reaper=None,
    )

    def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        core.tasks.add(task)
        task.add_done_callback(core.tasks.discard)
        return task

    core.spawn = spawn
    return core


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.storage = FakeLeaseStorage(self.world)
        self.clients: list[Client] = []
        self.steps = 0
        self.overlaps = 0  # moments when two clients believed they held it (after a disruption)

    @initialize(rates=st.lists(st.floats(0.9, 1.1), min_size=CLIENTS, max_size=CLIENTS),
                offsets=st.lists(st.floats(-500.0, 500.0), min_size=CLIENTS, max_size=CLIENTS))
    def make_clients(self, rates: list[float], offsets: list[float]) -> None:
        for i, (rate, offset) in enumerate(zip(rates, offsets, strict=True)):
            clock = Clock(self.world, rate, 1000.0 + offset, self.world.now)
            loop = ClientLoop(clock)
            writer = f"c{i}"
            core = _fake_core(self.storage, writer)
            keeper = LeaseKeeper(core)
            self.storage.latency[keeper.holder] = (0.0, 0.0)
            self.clients.append(Client(i, clock, loop, keeper, core, keeper.holder))
        self.acquire(0)  # every example starts with a holder to contend with

    # -- driving the loops ---------------------------------------------------------------------

    def _settle(self, c: Client) -> None:
        """Run ``c``'s loop until nothing is ready and no timer is due (never sleeps for real)."""
        loop = c.loop

        async def spin() -> None:
            for _ in range(200):
                await asyncio.sleep(0)
                if not loop._ready and loop.next_timer() > loop.time():
                    return
            raise AssertionError(f"client {c.index}'s loop does not settle")

        loop.run_until_complete(spin())
        self._observe(c)

    def _observe(self, c: Client) -> None:
        k = c.keeper
        if k.epoch is not None and (not c.epochs or c.epochs[-1] != k.epoch):
            c.epochs.append(k.epoch)
        if c.taint is not None and c.paused is None and k.epoch is not None and (
                k.valid_until - HELD >= c.taint - EPS):
            c.taint = None  # its belief now rests on a renewal started after the disruption

    def _advance_to(self, target: float) -> None:
        for _ in range(10_000):
            due = [(c.clock.storage_time_of(c.loop.next_timer()), c.index)
                   for c in self.clients if c.paused is None]
            at, i = min(due, default=(math.inf, -1))
            if at > target:
                break
            self.world.now = max(self.world.now, at + 1e-9)
            self._settle(self.clients[i])
            self.check_exclusion()
        else:
            raise AssertionError("time does not advance: a timer loop")
        self.world.now = max(self.world.now, target)
        for c in self.clients:
            if c.paused is None:
                self._settle(c)
        self.check_exclusion()

    def _start(self, c: Client, coro: Coroutine[Any, Any, None]) -> None:
        self.steps += 1
        c.op = c.loop.create_task(coro)
        self._settle(c)
        self._advance_to(self.world.now + TICK)

    def _free(self, c: Client) -> bool:
        return c.paused is None and (c.op is None or c.op.done())

    # -- rules ---------------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.05, 0.3, 1.0, TTL / 3, HELD, TTL, 2 * TTL]) | st.floats(0.01, 2 * TTL))
    def advance(self, dt: float) -> None:
        self._advance_to(self.world.now + dt)

    def _pick(self, i: int, ok: Callable[[Client], bool]) -> Client:
        """Client ``i``, or the next one after it that ``ok`` accepts (a rule's precondition
        promises there is one): no step is spent on a rule that cannot run."""
        return next(c for c in self.clients[i:] + self.clients[:i] if ok(c))

    def _can_take(self, c: Client) -> bool:
        return self._free(c) and c.keeper.epoch is None

    def _can_release(self, c: Client) -> bool:
        return self._free(c) and c.keeper.epoch is not None

    def _can_write(self, c: Client) -> bool:
        return self._free(c) and self._held(c)

    def _can_write_late(self, c: Client) -> bool:
        return self._free(c) and c.core.io.fence is not None and not self._held(c)

    @precondition(lambda self: any(self._can_take(c) for c in self.clients))
    @rule(i=st.integers(0, CLIENTS - 1))
    def acquire(self, i: int) -> None:
        c = self._pick(i, self._can_take)

        async def take() -> None:
            with contextlib.suppress(OwnedElsewhere, StorageError, TimeoutError):  # as a refused start
                await c.keeper.acquire(wait=0)

        self._start(c, take())

    @precondition(lambda self: any(self._can_release(c) for c in self.clients))
    @rule(i=st.integers(0, CLIENTS - 1))
    def release(self, i: int) -> None:
        c = self._pick(i, self._can_release)
        self._start(c, c.keeper.release())

    @precondition(lambda self: any(self._can_write(c) for c in self.clients))
    @rule(i=st.integers(0, CLIENTS - 1))
    def write(self, i: int) -> None:
        """A checkpoint write by a client that believes it holds the lease."""
        c = self._pick(i, self._can_write)
        self._start(c, self._write(c))

    @precondition(lambda self: any(self._can_write_late(c) for c in self.clients))
    @rule(i=st.integers(0, CLIENTS - 1))
    def write_late(self, i: int) -> None:
        """A write already on its way when the client stopped believing: the fence must refuse it."""
        c = self._pick(i, self._can_write_late)
        self._start(c, self._write(c))

    async def _write(self, c: Client) -> None:
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(STORAGE_TIMEOUT):
                    c.version = await self.storage.save(
                        KEY, f"{c.holder}@{c.core.io.fence.epoch}".encode(),
                        expected_version=c.version, fence=c.core.io.fence, writer=c.holder)
                return
            except LeaseLost as exc:
                # as the checkpoint writer: once, when the lease is ours again, write again
                if attempt == 2 or not await c.keeper.retake(exc):
                    return
            except ConflictError:
                stored = await self.storage.load(KEY)  # after a lost reply: learn the version
                c.version = None if stored is None else stored.version
                return
            except (StorageError, TimeoutError):
                return

    @rule(i=st.integers(0, CLIENTS - 1))
    def lose_next_reply(self, i: int) -> None:
        self.storage.lose_reply.add(self.clients[i].holder)
        self._advance_to(self.world.now + TICK)

    @rule(i=st.integers(0, CLIENTS - 1), before=st.sampled_from(LATENCIES),
          after=st.sampled_from(LATENCIES))
    def set_latency(self, i: int, before: float, after: float) -> None:
        self.storage.latency[self.clients[i].holder] = (before, after)
        self._advance_to(self.world.now + TICK)

    @precondition(lambda self: any(c.paused is None for c in self.clients))
    @rule(i=st.integers(0, CLIENTS - 1), frozen=st.booleans())
    def pause(self, i: int, frozen: bool) -> None:
        c = self._pick(i, lambda c: c.paused is None)
        if frozen:
            c.clock.freeze()
            c.taint = math.inf
        c.paused = "frozen" if frozen else "stopped"
        self._advance_to(self.world.now + TICK)

    @precondition(lambda self: any(c.paused is not None for c in self.clients))
    @rule(i=st.integers(0, CLIENTS - 1))
    def resume(self, i: int) -> None:
        c = self._pick(i, lambda c: c.paused is not None)
        if c.paused == "frozen":
            c.clock.thaw()
            c.taint = c.clock.now()
        c.paused = None
        self._settle(c)
        self._advance_to(self.world.now + TICK)

    @rule()
    def storage_loses_data(self) -> None:
        self.storage.lose_data()
        for c in self.clients:  # also those with a reply on its way: their start predates the loss
            c.taint = math.inf if c.paused == "frozen" else max(c.taint or -math.inf, c.clock.now())
        self._advance_to(self.world.now + TICK)

    # -- invariants ----------------------------------------------------------------------------

    def _held(self, c: Client) -> bool:
        k = c.keeper
        return k.epoch is not None and c.clock.now() < k.valid_until

    def check_exclusion(self) -> None:
        believing = [c for c in self.clients if self._held(c)]
        landing = [c.index for c in believing if self.storage.accepts(c.core.io.fence)]
        assert len(landing) <= 1, f"at {self.world.now}: clients {landing} both hold and can write"
        self.overlaps += len(believing) > 1
        sure = [c.index for c in believing if c.taint is None]
        assert len(sure) <= 1, f"at {self.world.now}: clients {sure} both believe they hold the lease"
        for c in believing:
            assert c.core.io.fence == Fence(LEASE, c.keeper.epoch), (c.index, c.core.io.fence, c.keeper.epoch)

    @invariant()
    def exclusion(self) -> None:
        if self.clients:
            self.check_exclusion()

    @invariant()
    def storage_rules(self) -> None:
        assert not self.storage.violations, self.storage.violations
        assert self.storage.epochs == sorted(set(self.storage.epochs)), self.storage.epochs
        for c in self.clients:
            assert c.epochs == sorted(set(c.epochs)), (c.index, c.epochs)

    def teardown(self) -> None:
        self._events()
        self._close()

    def _events(self) -> None:
        """What the example exercised (``--hypothesis-show-statistics`` shows the spread)."""
        landed = self.storage.landed
        event(f"operations: {min(self.steps, 8)}")
        event(f"two believers at once (a pause or data loss): {self.overlaps > 0}")
        event(f"writes landed: {'0' if not landed else '1-4' if len(landed) < 5 else '5+'}")
        event(f"epochs handed out: {min(len(self.storage.epochs), 5)}{'+' if len(self.storage.epochs) >= 5 else ''}")
        event(f"writers that landed: {len({w.writer for w in landed})}")
        event(f"lease lost by a keeper: {sum(c.core.counters['lease_lost'] for c in self.clients) > 0}")
        event(f"write refused by the fence: {self.storage.refused > 0}")

    def _close(self) -> None:
        try:
            for c in self.clients:
                if c.paused == "frozen":
                    c.clock.thaw()
                c.paused = None
                c.keeper.epoch = None  # stop its renew loop at its next wake-up
                c.loop.run_until_complete(asyncio.sleep(0))
                for task in asyncio.all_tasks(c.loop):
                    task.cancel()
                c.loop.run_until_complete(asyncio.sleep(0))
                c.loop.run_until_complete(asyncio.sleep(0))
                pending = [t for t in asyncio.all_tasks(c.loop) if not t.done()]
                assert not pending, pending
        finally:
            for c in self.clients:
                c.loop.close()


TestLeaseModel = pytest.mark.timeout(0 if scaled(1) > 1 else 120)(LeaseMachine.TestCase)
TestLeaseModel.settings = settings(settings.default, max_examples=scaled(600), stateful_step_count=80)


@pytest.mark.parametrize("rates", [(1.0, 1.0, 1.0), (0.9, 1.1, 1.0), (1.1, 0.9, 1.0)])
def test_stopped_holder_stops_believing_before_another_takes_over(rates: tuple[float, float, float]) -> None:
    """A SIGSTOPped holder's belief ends by its own clock before the storage lets another client take the lease."""
    m = LeaseMachine()
    try:
        m.make_clients(rates=list(rates), offsets=[0.0, 250.0, -250.0])
        assert m._held(m.clients[0])
        m.pause(0, False)
        for _ in range(40):  # try to take it every 0.25 s across the whole expiry window
            m.advance(0.25)
            if m._can_take(m.clients[1]):
                m.acquire(1)
            m.exclusion()
        assert m.clients[1].keeper.epoch is not None  # the takeover did happen
        m.resume(0)
        m.advance(TTL / 3)
        m.exclusion()
        assert m.clients[0].keeper.epoch is None  # the resumed holder saw the new holder and stopped
    finally:
        m._close()

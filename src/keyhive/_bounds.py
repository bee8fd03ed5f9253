"""Bounds (SPEC §13): ``max_live`` eviction and the ``checkpoint_ttl`` sweeper.

**Eviction.** :class:`Evictor` counts the registered incarnations of a manager (every
partition) and, when an activation takes the count over ``max_live``, picks victims and
hibernates them with ``StopReason.EVICTED`` through the reaper's batched hibernate. It
is an approximate LRU, a CLOCK over the registry's own order (no list, no per-agent
node): a ``get`` or a ``call`` sets the ref's ``_used`` bit (one attribute store, the
whole cost on the hot paths); the hand walks a registry from its oldest entry, gives a
used, busy or attached agent a second chance (clears the bit and moves it to the back:
the dict's order is the clock's queue), and evicts the first ones that are idle,
unattached and unused since the hand last passed. Attached agents are never evicted.

Victims are taken in batches (up to 1% of ``max_live``, at most ``hibernate_batch``) so
that a burst of misses makes batched writes; with :data:`_IN_FLIGHT` batches still being
written, an activation waits for the oldest (backpressure: a tight loop of misses that
never yields still keeps the registry near the cap). When every live agent is attached
or busy, the activation goes on over the cap: one warning per crossing, and
``stats().over_cap`` says so. After a scan that found nothing, large registries skip a
growing number of scans (up to 1/64 of the live count), so that a manager whose agents
are all attached does not pay a full scan per activation.

**Retention.** :class:`Sweeper` deletes, every ``min(checkpoint_ttl / 10, 60)`` seconds,
the checkpoints of this manager not written for ``checkpoint_ttl`` seconds of wall time
(the stored ``updated_at``): ``stale_keys`` in batches, then ``delete_if(key, version)``
under the manager's fence, so a checkpoint written meanwhile is never deleted. It sweeps
only while the manager holds its lease (when the storage keeps leases), never deletes
the checkpoint of a registered key, and an activation of a key whose delete is in flight
waits for it before its thaw (so it never thaws a checkpoint that is about to vanish).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ._errors import LeaseLost
from ._events import StopReason
from ._keys import decode_storage_key, storage_prefix
from ._lifecycle import RUNNING

if TYPE_CHECKING:
    from ._core import Core
    from ._ref import AgentRef

__all__ = ["Evictor", "Sweeper", "check_retention", "sweep_interval"]

logger = logging.getLogger("keyhive")

_IN_FLIGHT = 4  # eviction batches being written before an activation waits for the oldest
_SWEEP_BATCH = 500  # stale_keys page and delete_if calls per round trip group
_DELETES_AT_ONCE = 32  # delete_if calls in flight at once


def _wall() -> float:
    """Wall-clock seconds since the epoch: stored ``updated_at`` is wall time (tests patch it)."""
    return time.time()


class Evictor:
    """``max_live`` of one manager: counts registered agents and evicts the least recently used."""

    def __init__(self, core: Core, cap: int) -> None:
        self.core = core
        self.cap = cap
        self.live = 0  # registered incarnations (starting, running or stopping), every partition
        self.leaving = 0  # victims picked whose hibernate has not finished
        self.batch = max(1, min(core.options.hibernate_batch, cap // 100))
        self.over = False  # over the cap with nothing to evict (warned once per crossing)
        self._batches: deque[asyncio.Task[Any]] = deque()
        self._skip = 0  # scans to skip after one that found nothing
        self._skipping = 0

    @property
    def over_cap(self) -> bool:
        """Whether more agents are live (not counting victims on their way out) than ``max_live``."""
        return self.live - self.leaving > self.cap

    def gone(self) -> None:
        """An incarnation left the registry."""
        self.live -= 1

    async def admit(self) -> None:
        """An activation registered one more incarnation: make room when that is over the cap.

        Raises nothing of its own: when there is no room to make, the cap is exceeded.
        """
        self.live += 1
        excess = self.live - self.leaving - self.cap
        if excess <= 0:
            self.over = False
            return
        if self._skipping > 0:
            self._skipping -= 1
        else:
            victims = self._pick(max(excess, self.batch))
            if victims:
                self._evict(victims)
                self._skip = 0
            else:
                self._skip = min(max(1, 2 * self._skip), self.live // 64)
                self._skipping = self._skip
        if self.over_cap:
            if not self.over:
                self.over = True
                logger.warning(
                    "keyhive: %s: %d agents are live, over max_live=%d: every live agent is attached "
                    "or busy, so none can be evicted (logged once until it is back under the cap)",
                    self.core.name, self.live - self.leaving, self.cap)
        else:
            self.over = False
        batches = self._batches
        while batches and batches[0].done():
            batches.popleft()
        if len(batches) >= _IN_FLIGHT and asyncio.current_task() not in self.core.tasks:
            # Backpressure: a burst of misses waits for the oldest eviction batch to land.
            # (Not from a manager task, e.g. an on_hibernate of a victim: it would wait on itself.)
            await asyncio.wait([batches[0]])

    def _pick(self, n: int) -> list[AgentRef]:
        """Up to ``n`` victims: the CLOCK hand (module docstring), oldest registry entries first."""
        victims: list[AgentRef] = []
        spared: list[AgentRef] = []  # used since the hand last passed: a second chance
        moved: list[AgentRef] = []
        for reg in self.core.regs.values():
            for ref in reg.values():
                if ref._status is not RUNNING:
                    continue  # starting, or already on its way out
                if ref._owners is not None or ref._busy:
                    moved.append(ref)  # in use now: to the back of the queue
                elif ref._used:
                    ref._used = False
                    spared.append(ref)
                else:
                    victims.append(ref)
                    if len(victims) >= n:
                        break
            if len(victims) >= n:
                break
        else:
            # A full turn of the hand: the spared ones are unused now, oldest first.
            take = spared[:n - len(victims)]
            victims.extend(take)
            spared = spared[len(take):]
        regs = self.core.regs
        for ref in (*spared, *moved):
            home = regs.get(ref._partition)
            if home is not None and home.get(ref._key) is ref:
                del home[ref._key]
                home[ref._key] = ref
        return victims

    def _evict(self, victims: list[AgentRef]) -> None:
        """Take the victims' free turns now (they are STOPPING from here on) and hibernate them."""
        for ref in victims:
            ref._busy = True  # the turn is free (checked by _pick): take it, as the reaper does
            ref.begin_stop()
        self.leaving += len(victims)
        core = self.core
        self._batches.append(core.spawn(self._hibernate(victims)))

    async def _hibernate(self, victims: list[AgentRef]) -> None:
        try:
            await self.core.reaper.hibernate(victims, StopReason.EVICTED)
        finally:
            self.leaving -= len(victims)


def sweep_interval(ttl: float) -> float:
    """Seconds between sweeps for ``checkpoint_ttl=ttl``: ``min(ttl / 10, 60)``."""
    return min(ttl / 10, 60.0)


def check_retention(storage: Any, ttl: float | None) -> None:
    """``checkpoint_ttl`` needs a storage with ``stale_keys`` and ``delete_if``.

    Raises:
        ValueError: ``checkpoint_ttl`` is set with ``storage=None``.
        TypeError: the storage has no ``stale_keys``/``delete_if`` (every shipped backend has).
    """
    if ttl is None:
        return
    if storage is None:
        raise ValueError("checkpoint_ttl needs a storage: with storage=None nothing is stored to expire; "
                         "drop checkpoint_ttl or give a storage such as 'sqlite:///agents.db'")
    missing = [m for m in ("stale_keys", "delete_if") if not callable(getattr(storage, m, None))]
    if missing:
        raise TypeError(
            f"checkpoint_ttl needs a storage with {' and '.join(missing)}(): {type(storage).__name__} has "
            f"not (every shipped backend has them); drop checkpoint_ttl or use a shipped backend")


class Sweeper:
    """Deletes this manager's checkpoints older than ``checkpoint_ttl`` (module docstring)."""

    def __init__(self, core: Core, ttl: float) -> None:
        self.core = core
        self.ttl = ttl
        self.interval = sweep_interval(ttl)
        self.deleting: dict[str, asyncio.Future[None]] = {}  # storage key -> its delete_if landed
        self.task: asyncio.Task[None] | None = None
        self.deleted = 0

    def start(self) -> None:
        """Begin sweeping (the manager has started)."""
        self.task = self.core.spawn(self._run())

    def close(self) -> None:
        """Stop sweeping (close begins); a delete in flight finishes on its own."""
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def wait_for(self, skey: str) -> None:
        """An activation of ``skey``: wait until a delete of its checkpoint in flight has landed."""
        fut = self.deleting.get(skey)
        if fut is not None:
            await asyncio.shield(fut)

    async def _run(self) -> None:
        core = self.core
        while core.is_open:
            await asyncio.sleep(self.interval)
            lease = core.lease
            if lease is not None and not lease.held:
                continue  # the lease holder's job (SPEC §13); this manager serves nothing now
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except LeaseLost as exc:
                if core.lease is not None:
                    core.lease.lost(exc)
            except Exception as exc:  # noqa: BLE001  # a failed sweep is logged; the next one tries again
                logger.warning("keyhive: %s: checkpoint_ttl sweep failed, next in %.0fs: %r",
                               core.name, self.interval, exc)

    async def sweep(self) -> int:
        """One sweep: delete every stale checkpoint of this manager whose key is not live.

        Returns:
            How many checkpoints were deleted.
        """
        core = self.core
        storage = core.io.storage
        prefix = storage_prefix(core.name)
        cutoff = _wall() - self.ttl
        skipped = 0  # stale but kept (live, foreign, or not deleted): first in every page again
        deleted = 0
        while core.is_open:
            limit = _SWEEP_BATCH + skipped
            async with asyncio.timeout(core.options.storage_timeout):
                stale = await storage.stale_keys(prefix, cutoff, limit=limit)
            todo = [(item.key, item.version) for item in stale if not self._live(item.key)]
            gone = 0
            for start in range(0, len(todo), _DELETES_AT_ONCE):
                chunk = todo[start:start + _DELETES_AT_ONCE]
                results = await asyncio.gather(*(self._delete(k, v) for k, v in chunk),
                                               return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                    gone += result
            deleted += gone
            if len(stale) < limit:
                break  # that was the last page
            skipped = len(stale) - gone  # the next page is bigger by what stays, or the same size
        self.deleted += deleted
        if deleted:
            logger.info("keyhive: %s: deleted %d checkpoints not written for %ss (checkpoint_ttl)",
                        core.name, deleted, self.ttl)
        return deleted

    def _live(self, skey: str) -> bool:
        """Whether ``skey`` is a registered key of this manager (or not one of its checkpoints)."""
        core = self.core
        try:
            name, partition, key = decode_storage_key(skey)
        except ValueError:
            return True  # not a keyhive checkpoint: never ours to delete
        if name != core.name:
            return True
        reg = core.regs.get(partition)
        try:
            return reg is not None and key in reg
        except TypeError:
            return True  # an unhashable decoded key cannot be registered, but be safe

    async def _delete(self, skey: str, version: int) -> int:
        """``delete_if`` of one checkpoint; activations of its key wait for it. 1 when deleted."""
        if self._live(skey) or skey in self.deleting:  # activated while the page was read
            return 0
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.deleting[skey] = fut
        try:
            fence = self.core.io.fence if self.core.io.fenced else None
            storage = self.core.io.storage
            timeout = self.core.options.storage_timeout
            async with asyncio.timeout(timeout):
                if fence is None:
                    done = await storage.delete_if(skey, version)
                else:
                    done = await storage.delete_if(skey, version, fence=fence)
        finally:
            del self.deleting[skey]
            fut.set_result(None)
        return 1 if done else 0


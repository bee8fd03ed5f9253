"""The manager's lease (SPEC §10): one owner per namespace (or shard) across processes.

On ``start()`` the manager takes the lease ``"<name>/*"`` (a shard host of a runtime:
``"<name>/<shard>"``) in the storage itself, waiting up to ``lease_wait`` for another
live holder, then :class:`~keyhive.OwnedElsewhere`. While it holds it, every checkpoint
write carries the lease's epoch as a fence, so a holder whose lease was taken over
writes nothing (:class:`~keyhive.LeaseLost`).

Renewal is one storage call every ``lease_ttl / 3`` per manager, never one per agent.
Safety uses only this process's own monotonic clock: the lease counts as held until
``(start of the last successful renewal) + lease_ttl * (1 - _MARGIN)``; the storage
judges expiry by its own clock, at least as late. When that passes without a renewal,
or the lease turns out to be another holder's, the manager stops serving: every live
agent stops with ``StopReason.LEASE_LOST`` without writing, and the next activation
takes the lease again (or raises ``OwnedElsewhere``). A write refused because the lease
record itself is gone (a storage restarted without its data) takes the lease again when
nobody else holds it; the refused writes are retried as any failed write is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from ._errors import LeaseLost, OwnedElsewhere
from ._events import StopReason
from .storage import Fence, Lease

if TYPE_CHECKING:
    from ._core import Core

__all__ = ["LeaseKeeper", "has_leases"]

logger = logging.getLogger("keyhive")

_MARGIN = 0.25  # of lease_ttl: stop serving this long before the storage could expire the lease


def has_leases(storage: object) -> bool:
    """Whether ``storage`` implements the lease methods of :class:`~keyhive.storage.LeaseStorage`."""
    return all(callable(getattr(storage, m, None)) for m in ("acquire_lease", "release_lease", "read_lease"))


class LeaseKeeper:
    """Takes, renews, releases and loses one manager's lease."""

    def __init__(self, core: Core) -> None:
        self.core = core
        options = core.options
        self.storage: Any = core.io.storage
        self.name = f"{core.name}/{'*' if options.shard is None else options.shard}"
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{core.io.writer}"
        self.ttl = options.lease_ttl
        self.epoch: int | None = None
        self.valid_until = 0.0  # loop time: held until then without a renewal
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._recovering: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        """Whether the lease is held now (by this process's own clock)."""
        return self.epoch is not None and asyncio.get_running_loop().time() < self.valid_until

    async def _acquire_once(self, *, takeover: bool) -> tuple[Lease, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self.core.options.storage_timeout
        async with asyncio.timeout(timeout):
            lease = await self.storage.acquire_lease(self.name, self.holder, self.ttl, takeover=takeover)
        return lease, started

    async def acquire(self, *, wait: float, takeover: bool = False) -> None:
        """Take the lease, waiting up to ``wait`` seconds for another live holder.

        Raises:
            OwnedElsewhere: another live process holds it (after ``wait``).
            StorageError: the storage failed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            lease, started = await self._acquire_once(takeover=takeover)
            if lease.holder == self.holder:
                self._took(lease, started)
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._elsewhere(lease)
            await asyncio.sleep(min(remaining, max(0.05, min(lease.expires_in, self.ttl / 3))))

    def _elsewhere(self, lease: Lease) -> OwnedElsewhere:
        """The error for a lease another live process holds: who, since when, what to do."""
        host, _, rest = lease.holder.partition(":")
        pid = rest.partition(":")[0]
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.acquired_at))
        age = max(0.0, time.time() - lease.acquired_at)
        return OwnedElsewhere(
            f"manager {self.core.name!r} is already running in another process (host {host}, pid {pid}, "
            f"holding its lease since {since}, {age:.0f}s ago; it expires {lease.expires_in:.1f}s after "
            f"its last renewal). One process owns a manager's agents: to serve them from several "
            f"processes or web workers, use the Ray runtime: "
            f"InstanceManager(..., runtime=keyhive.ray.RayRuntime(address='auto')); or give this "
            f"process time to take over with lease_wait=...",
            holder=lease.holder, since=lease.acquired_at,
        )

    def _took(self, lease: Lease, started: float) -> None:
        """The lease is ours (``started``: when we asked): fence writes with its epoch, renew."""
        if self.epoch is not None and lease.epoch != self.epoch:
            # It passed through other hands since (we were not serving): a new epoch.
            logger.info("keyhive: %s: lease %r taken again at epoch %d", self.core.name, self.name,
                        lease.epoch)
        self.epoch = lease.epoch
        self.core.io.fence = Fence(self.name, lease.epoch)
        self.core.io.retake = self.retake
        self._renewed(started)
        if self._task is None:
            self._task = self.core.spawn(self._renew_loop())

    def _renewed(self, started: float) -> None:
        loop = asyncio.get_running_loop()
        self.valid_until = started + self.ttl * (1 - _MARGIN)
        if self._watch is not None:
            self._watch.cancel()
        self._watch = loop.call_at(self.valid_until, self._expired)

    def _expired(self) -> None:
        self._watch = None
        if self.epoch is not None and asyncio.get_running_loop().time() >= self.valid_until:
            self._stop_serving(
                LeaseLost(f"lease {self.name!r} could not be renewed within lease_ttl={self.ttl}s"))

    async def _renew_loop(self) -> None:
        """Renew every ``lease_ttl / 3``; retry sooner after a failure."""
        interval = self.ttl / 3
        delay = interval
        try:
            # also while closing: the drain's writes need the lease (release() ends this loop)
            while self.epoch is not None:
                await asyncio.sleep(delay)
                if self.epoch is None:
                    break
                try:
                    lease, started = await self._acquire_once(takeover=False)
                except Exception as exc:  # noqa: BLE001  # storage down: keep serving until the deadline
                    logger.warning("keyhive: %s: renewing lease %r failed, retrying: %r",
                                   self.core.name, self.name, exc)
                    delay = interval / 4
                    continue
                if lease.holder != self.holder:
                    self._stop_serving(LeaseLost(
                        f"lease {self.name!r} was taken over by {lease.holder} (epoch {lease.epoch})"))
                    break
                if lease.epoch != self.epoch:
                    # Ours again under a new epoch: the record was lost (a storage restarted
                    # without its data) or lapsed. Nobody else held it meanwhile with our
                    # epoch, and compare-and-set versions guard the checkpoints: go on.
                    logger.warning("keyhive: %s: lease %r renewed under a new epoch %d (was %d)",
                                   self.core.name, self.name, lease.epoch, self.epoch)
                    self._took(lease, started)
                else:
                    self._renewed(started)
                delay = interval
        finally:
            self._task = None

    def lost(self, error: BaseException) -> None:
        """A fenced write was refused (after :meth:`retake` failed): stop serving unless the
        lease is ours again by now."""
        if self.epoch is None or self._recovering is not None:
            return
        self._recovering = self.core.spawn(self.retake(error))

    async def retake(self, error: BaseException) -> bool:
        """A fenced write was refused: take the lease again when nobody else holds it (its
        record was lost by a storage restarted without its data, or it lapsed). True when it
        is ours again (the fence is updated: retry the write); else stop serving."""
        if self._recovering is not None and self._recovering is not asyncio.current_task():
            await asyncio.wait([self._recovering])
            return self.epoch is not None
        if self.epoch is None:
            return False
        try:
            try:
                lease, started = await self._acquire_once(takeover=False)
            except Exception as exc:  # noqa: BLE001  # storage down: the renewal deadline decides
                logger.warning("keyhive: %s: lease %r: a write was refused (%s) and the lease could "
                               "not be read again: %r", self.core.name, self.name, error, exc)
                return False
            if lease.holder == self.holder:
                if lease.epoch != self.epoch:
                    logger.warning("keyhive: %s: lease %r was lost by the storage (%s) and taken "
                                   "again at epoch %d", self.core.name, self.name, error, lease.epoch)
                self._took(lease, started)
                return True
            self._stop_serving(error)
            return False
        finally:
            if self._recovering is asyncio.current_task():
                self._recovering = None

    def _stop_serving(self, error: BaseException) -> None:
        """The lease is another holder's: every live agent stops without writing."""
        if self.epoch is None:
            return
        core = self.core
        self.epoch = None
        # io.fence keeps the old epoch: a write still on its way is refused by the storage
        # itself (LeaseLost), never sent unfenced
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        core.counters["lease_lost"] += 1
        refs = core.live_refs()
        logger.error("keyhive: %s: lost lease %r (%s); %d live agents stop without writing "
                     "(StopReason.LEASE_LOST)", core.name, self.name, error, len(refs))
        for ref in refs:
            if ref.alive:
                core.spawn(core.reaper.finish(ref, StopReason.LEASE_LOST, saved=False))

    async def release(self) -> None:
        """Give the lease up (close): a successor takes it over at once."""
        epoch, self.epoch = self.epoch, None  # io.fence stays: a released lease refuses it
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._task is not None:
            self._task.cancel()
        if epoch is None:
            return
        try:
            async with asyncio.timeout(self.core.options.storage_timeout):
                await self.storage.release_lease(self.name, self.holder, epoch)
        except Exception as exc:  # noqa: BLE001  # it expires by itself after lease_ttl
            logger.warning("keyhive: %s: releasing lease %r failed (it expires in %.0fs): %r",
                           self.core.name, self.name, self.ttl, exc)

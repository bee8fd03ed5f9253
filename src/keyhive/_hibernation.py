"""Hibernation: the reaper, batched hibernate, finishing a stop, and the failure policy.

Agents that idled out, stopped themselves or were evicted are queued on the reaper,
which hibernates them in batches (``hibernate_batch`` per ``save_many``), with up to
``_IN_FLIGHT`` batches written at once so that the loop prepares the next batch while
storage writes the last one. ``manager.stop`` and the drain call :meth:`Reaper.hibernate`
directly.

What a failed hibernate does depends only on why the agent was stopping; that is the
table :data:`POLICY`. A hook of one agent that raises (even a ``BaseException`` such as
``CancelledError``) fails that agent alone, never the others of its batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ._checkpoint import storage_error
from ._commit import stopped as commit_stopped
from ._errors import AgentStopped, CodecError, ConflictError, LeaseLost
from ._events import EventKind, StopReason
from ._lifecycle import RUNNING, STOPPED, STOPPING
from ._timers import stopped as timers_stopped
from .storage import SaveItem

if TYPE_CHECKING:
    from ._core import Core
    from ._ref import AgentRef

__all__ = ["POLICY", "Reaper"]

logger = logging.getLogger("keyhive")

_IN_FLIGHT = 4  # hibernate batches written at once by the reaper
_new_item = tuple.__new__  # SaveItem without its Python-level __new__ (one per agent of a storm)


class Policy(NamedTuple):
    """What a failed hibernate does, by the reason of the stop."""

    conflict_stops: bool  # a ConflictError stops the agent (CONFLICT): retrying cannot win
    retry: str | None  # "deadline": postpone the idle deadline; "self": ask the self-stop again
    release: bool  # give the turn back (the drain keeps it for its next round)


POLICY: dict[StopReason, Policy] = {
    StopReason.IDLE_TIMEOUT: Policy(conflict_stops=True, retry="deadline", release=True),
    StopReason.NORMAL: Policy(conflict_stops=True, retry="self", release=True),
    StopReason.EVICTED: Policy(conflict_stops=True, retry=None, release=True),
    StopReason.STOPPED: Policy(conflict_stops=False, retry=None, release=True),  # the caller gets it
    StopReason.SHUTDOWN: Policy(conflict_stops=False, retry=None, release=False),  # the drain retries
}


def _our_cancellation() -> bool:
    """Whether the running task itself is being cancelled (not a hook raising CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Reaper:
    """Hibernates queued agents in batches; finishes stops; applies the failure policy."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.expiring: list[tuple[AgentRef, StopReason, bool]] = []  # (ref, reason, turn held)
        self.task: asyncio.Task[None] | None = None
        self.retries: set[asyncio.TimerHandle] = set()

    # -- what gets queued -----------------------------------------------------------------------

    def on_due(self, refs: list[Any]) -> None:
        """The wheel found these agents past their idle deadline."""
        expiring = self.expiring
        for ref in refs:
            if ref._status is RUNNING:  # status is read by every part
                expiring.append((ref, StopReason.IDLE_TIMEOUT, False))
        self.kick()

    def self_stop(self, ref: AgentRef) -> bool:
        """``agent.stop()`` takes effect at the end of a turn: keep the turn for the stop.

        While the manager closes, the drain stops the agent instead (False).
        """
        if not self.core.is_open:
            return False
        ref.begin_stop()
        # Whatever reason the agent gave, a self-stop saves, fails and retries as NORMAL;
        # finish() reports the reason it asked for (the stop request keeps it until then).
        self.expiring.append((ref, StopReason.NORMAL, True))
        self.kick()
        return True

    def evict(self, ref: AgentRef) -> None:
        """``max_live`` needs room: hibernate ``ref`` (least recently used, unattached)."""
        self.expiring.append((ref, StopReason.EVICTED, False))
        self.kick()

    def kick(self) -> None:
        """Start the reaper task when there is work and none runs."""
        if self.task is None and self.expiring and self.core.is_open:
            self.task = self.core.spawn(self._reap())

    async def _reap(self) -> None:
        """Hibernate queued agents in batches, up to ``_IN_FLIGHT`` batches at once."""
        core = self.core
        size = core.options.hibernate_batch
        in_flight: set[asyncio.Task[Any]] = set()
        try:
            while self.expiring and core.is_open:
                batch = self.expiring[:size]
                del self.expiring[:size]
                now = core.wheel.now()
                ready: dict[StopReason, list[AgentRef]] = {}
                for ref, reason, held in batch:
                    if not held:
                        if not self._stop_wanted(ref, reason, now):
                            continue
                        if ref._busy:  # the turn flag is shared by design
                            core.spawn(self._stop_when_free(ref, reason))
                            continue
                        ref._busy = True
                        self._begin(ref, reason)
                    ready.setdefault(reason, []).append(ref)
                for reason, refs in ready.items():
                    if len(in_flight) >= _IN_FLIGHT:
                        _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    in_flight.add(core.spawn(self.hibernate(refs, reason)))
                if not self.expiring and in_flight:  # let the last batches land before leaving
                    _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if in_flight:
                await asyncio.wait(in_flight)
        finally:
            self.task = None
            if self.expiring and core.is_open:
                self.kick()

    def _still_due(self, ref: AgentRef, now: float) -> bool:
        """Whether an agent the wheel found due is still due; if not, file it again.

        The loop runs a slot's timer up to its clock resolution early, and the wheel judges
        by the slot's time: judge with the same slack, or an agent found due there is found
        not due here and, with nothing re-arming it, never idles out again.
        """
        if ref.is_due(now + self.core.options.timer_resolution):
            return True
        deadline = ref.idle_deadline
        if deadline is not None and ref.attachments == 0:
            self.core.wheel.arm(ref, deadline)
        return False

    def _stop_wanted(self, ref: AgentRef, reason: StopReason, now: float) -> bool:
        """Whether a queued stop still applies: the agent runs and, for an idle stop, is due;
        an eviction only while nobody is attached."""
        if ref._status is not RUNNING:
            return False
        if reason is StopReason.IDLE_TIMEOUT:
            return self._still_due(ref, now)
        if reason is StopReason.EVICTED:
            return ref.attachments == 0
        return True

    async def _stop_when_free(self, ref: AgentRef, reason: StopReason) -> None:
        """A queued stop found the agent mid-turn: wait for its turn, then stop it."""
        try:
            await ref._acquire()
        except AgentStopped:
            return
        if not self.core.is_open or not self._stop_wanted(ref, reason, self.core.wheel.now()):
            ref._release()
            return
        self._begin(ref, reason)
        await self.hibernate([ref], reason)

    def _begin(self, ref: AgentRef, reason: StopReason) -> None:
        """We hold the agent's turn: it is stopping now."""
        ref.begin_stop()
        core = self.core
        if reason is StopReason.IDLE_TIMEOUT and core.listeners:
            core.emit(EventKind.IDLE, ref, reason)

    # -- the hibernate --------------------------------------------------------------------------

    async def hibernate(self, refs: Sequence[AgentRef], reason: StopReason, *,
                        timeout: float | None = None) -> list[BaseException | None]:
        """Save and stop agents whose turns we hold (status STOPPING); one result each.

        Failed ones are put back to running and handled as :data:`POLICY` says; the
        returned errors say which. ``timeout`` bounds the write (close's deadline).
        """
        core = self.core
        io = core.io
        errors: list[BaseException | None] = [None] * len(refs)
        if io.storage is not None:
            items: list[SaveItem] = []
            index: list[int] = []
            seqs: list[int] = []
            digests: list[bytes] = []
            dues: list[float | None] = []  # each agent's earliest timer, for the due-time index
            pending = [ref._x.writing for ref in refs  # a live write in flight
                       if ref._x is not None and ref._x.writing is not None]
            if pending:
                await asyncio.wait(pending)
            for i, ref in enumerate(refs):
                agent = ref._agent
                assert agent is not None
                try:
                    if core.runs_on_hibernate:
                        ref._dirty = True  # the hook may change the state
                        await agent.on_hibernate()
                    x = ref._x
                    queued = x is not None and x.commit is not None and x.commit.data is not None
                    if not ref._dirty and not queued:  # no turn since the last write or thaw
                        continue
                    payload, meta, due, d = io.encode_state(ref, agent)
                    if ref._digest == d and ref._version is not None:
                        ref._dirty = False
                        continue  # unchanged since it was written or thawed: keep the version
                    data, seq = io.envelope(agent, payload, meta)
                except BaseException as exc:
                    if not isinstance(exc, Exception) and _our_cancellation():
                        raise
                    ref._dirty = True
                    errors[i] = exc if isinstance(exc, Exception) else storage_error(
                        RuntimeError(f"on_hibernate raised {exc!r}"))
                    if isinstance(exc, CodecError):
                        self._codec_failed(ref, exc)
                    continue
                items.append(_new_item(SaveItem, (io.key(ref), data, ref._version)))
                index.append(i)
                seqs.append(seq)
                digests.append(d)
                dues.append(due)
            if items:
                timed = any(due is not None for due in dues)
                results = await io.save_batch(items, dues if timed else None, timeout=timeout)
                core.counters["writes"] += len(items)
                for i, item, seq, d, due, result in zip(index, items, seqs, digests, dues, results,
                                                        strict=True):
                    ref = refs[i]
                    if isinstance(result, ConflictError) and not isinstance(result, LeaseLost):
                        result = await io.resave_after_lost_reply(ref, item, result, due)
                    if not isinstance(result, BaseException):
                        ref.written(result, d)
                        ref._dirty = False
                        continue
                    if not isinstance(result, ConflictError):
                        io.remember_unsure(ref, seq)
                    ref._dirty = True
                    errors[i] = result
        for i, ref in enumerate(refs):
            error = errors[i]
            if error is None:
                await self.finish(ref, reason, saved=io.storage is not None)
            else:
                await self.failed(ref, reason, error)
        return errors

    def _codec_failed(self, ref: AgentRef, exc: CodecError) -> None:
        """The first encode failure of an incarnation is an ERROR with the key and a hint."""
        x = ref._rare()
        if x.codec_logged:
            return
        x.codec_logged = True
        logger.error("keyhive: %s: the state of key %r cannot be encoded, so it cannot be saved: %s "
                     "(use JSON-compatible values: a list instead of a set, str dict keys; or "
                     "declare state_type on the agent class)", self.core.name, ref.key, exc)

    async def finish(self, ref: AgentRef, reason: StopReason, *, saved: bool) -> None:
        """The checkpoint is written (or storage is off): run on_stop and unregister."""
        if ref._status is STOPPED:
            return  # stopped meanwhile (a lost lease stops every agent at once)
        core = self.core
        asked = ref.take_stop_request()
        if reason is StopReason.NORMAL and asked is not None:
            reason = asked  # a self-stop: the reason the agent gave
        agent = ref._agent
        if agent is not None and core.runs_on_stop:
            try:
                await agent.on_stop(reason)
            except BaseException as exc:
                if not isinstance(exc, Exception) and _our_cancellation():
                    raise
                logger.exception("keyhive: %s: on_stop of key %r failed", core.name, ref.key)
        core.unregister(ref)
        x = ref._x
        if x is not None and x.commit is not None:
            commit_stopped(ref, saved)
        if x is not None and x.timers is not None:
            timers_stopped(ref, saved)
        ref.stopped(reason)
        counters = core.counters
        counters["stopped"] += 1
        if saved:
            counters["hibernated"] += 1
        if reason is StopReason.EVICTED:
            counters["evicted"] += 1
        if core.listeners:
            if saved:
                core.emit(EventKind.HIBERNATED, ref, reason)
            core.emit(EventKind.STOPPED, ref, reason)

    async def failed(self, ref: AgentRef, reason: StopReason, error: BaseException) -> None:
        """A hibernate failed: stop on a lost conflict, else keep the agent and retry as the
        policy of ``reason`` says."""
        core = self.core
        core.counters["hibernate_failures"] += 1
        if core.listeners:
            core.emit(EventKind.HIBERNATE_FAILED, ref, reason, error)
        policy = POLICY.get(reason, POLICY[StopReason.STOPPED])
        if isinstance(error, LeaseLost):
            if core.lease is not None:
                core.lease.lost(error)
        elif isinstance(error, ConflictError) and policy.conflict_stops:
            # Retrying cannot win and overwriting would lose the newer state: stop this one.
            logger.error("keyhive: %s: key %r: newer state is stored by another incarnation; "
                         "this one stops without saving: %s", core.name, ref.key, error)
            await self.finish(ref, StopReason.CONFLICT, saved=False)
            return
        ref.stop_failed()
        x = ref._rare()
        x.failures += 1
        wheel = core.wheel
        deadline = ref.idle_deadline
        if policy.retry != "deadline" and core.is_open and deadline is not None and ref.attachments == 0:
            # The wheel drops an agent it finds STOPPING; if its idle deadline passed
            # during this failed save, file it again or it never idles out.
            wheel.arm(ref, deadline)
        if policy.retry is not None and core.is_open:
            delay = core.options.backoff(x.failures)
            if not isinstance(error, CodecError):
                logger.warning("keyhive: %s: hibernate of key %r failed (attempt %d), agent kept alive, "
                               "retry in %.1fs: %r", core.name, ref.key, x.failures, delay, error)
            if policy.retry == "deadline":
                ref.postponed(wheel.now() + delay)
                wheel.arm(ref, wheel.now() + delay)
            else:
                # Asked again when the retry is due; until then turns end as usual.
                asked = ref.take_stop_request() or reason
                handle = asyncio.get_running_loop().call_later(delay, self._retry_self_stop, ref, asked)
                self.retries.add(handle)
        if policy.release:
            ref._release()
        ref.notify()

    def _retry_self_stop(self, ref: AgentRef, reason: StopReason) -> None:
        """A self-stop whose save failed is asked again (its backoff has passed)."""
        now = self.core.wheel.now()
        self.retries = {h for h in self.retries if not h.cancelled() and h.when() > now}
        if not self.core.is_open:
            return
        if ref._status is RUNNING:
            ref.request_stop_now(reason)
        elif ref._status is STOPPING and ref.stop_requested is None:
            # Another hibernate (stop()) holds the turn: should it fail, the agent's own
            # stop is still pending and begins as that turn ends.
            ref._rare().stop_req = reason

    def close(self) -> None:
        """Close begins: forget queued stops and retries (the drain stops everyone)."""
        for handle in self.retries:
            handle.cancel()
        self.retries.clear()
        for ref, _, held in self.expiring:
            if held and ref._status is STOPPING:  # a self-stop not begun: the drain takes it
                ref.stop_failed()
                ref._release()
        self.expiring.clear()

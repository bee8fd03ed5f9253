"""Durability of live agents (SPEC §9): ``checkpoint="turn"``, write-behind, ``self.checkpoint()``.

``"turn"``: at the end of every turn that changed the state, the state is encoded (a
turn boundary) and the ref is queued; one flush per loop iteration writes every queued
ref in one ``save_many`` batch (group commit), and a ``call`` returns once the batch
holding its turn's state has landed. A failed write reaches the caller as
``StorageError``; the state stays in memory and the next successful write carries it.

A number ``s`` (write-behind): a changed agent is queued at the end of its turn and
written, in batches, at most ``s`` seconds later; the state is encoded at flush time,
at a turn boundary.

At most one write per ref is in flight; what changes meanwhile waits for the next flush.
A state whose encoding is what was last queued or written is not written again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ._checkpoint import storage_error
from ._errors import AgentStopped, ConflictError, LeaseLost, StorageError
from ._events import StopReason
from ._lifecycle import RUNNING
from .storage import SaveItem

if TYPE_CHECKING:
    from ._core import Core
    from ._ref import AgentRef

__all__ = ["Committer", "checkpoint_now"]

logger = logging.getLogger("keyhive")

_IN_FLIGHT = 4  # group-commit batches written at once


class _Pending:
    """What waits to be written for one ref: the newest encoded state and its callers."""

    __slots__ = ("data", "digest", "due", "queued", "seq", "waiters")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.due: float | None = None  # the earliest timer of ``data``, for the due-time index
        self.seq = 0
        self.digest: bytes | None = None  # of the newest state queued or written
        self.waiters: list[asyncio.Future[None]] = []
        self.queued = False


def _pending(ref: AgentRef) -> _Pending:
    x = ref._rare()
    p = x.commit
    if p is None:
        p = x.commit = _Pending()
        p.digest = ref._digest
    return p  # type: ignore[no-any-return]


class Committer:
    """Writes live agents' states as the checkpoint policy says (one per manager)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        policy = core.options.checkpoint
        self.per_turn = policy == "turn"
        self.interval = None if isinstance(policy, str) else float(policy)
        self.queue: list[AgentRef] = []
        self._scheduled: asyncio.Handle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    # -- the end of a turn (the turn is still held) -----------------------------------------

    def turn_ended(self, ref: AgentRef) -> asyncio.Future[None] | None:
        """Queue ``ref``'s new state; with ``"turn"``, the future a caller awaits."""
        if self.core.io.storage is None:
            return None
        if not self.per_turn:
            self._enqueue(ref, _pending(ref))
            return None
        agent = ref._agent
        loop = asyncio.get_running_loop()
        if agent is None:  # stopped during the turn (its lease was lost): nothing is written
            failed: asyncio.Future[None] = loop.create_future()
            failed.set_exception(_stopped_during_turn(ref))
            return failed
        io = self.core.io
        try:
            payload, meta, due, d = io.encode_state(ref, agent)
            p = _pending(ref)
            if d == p.digest and ref._version is not None:
                ref._dirty = False
                inflight = ref._x.writing if ref._x is not None else None
                if inflight is None and p.data is None:
                    return None  # unchanged since it was written: durable already
                fut: asyncio.Future[None] = loop.create_future()
                p.waiters.append(fut)  # durable once what is queued or in flight lands
                self._enqueue(ref, p)
                return fut
            p.data, p.seq = io.envelope(agent, payload, meta)
            p.digest, p.due = d, due
        except Exception as exc:  # noqa: BLE001  # the encode failure is the caller's answer (CodecError, size limit)
            fut = loop.create_future()
            fut.set_exception(exc)
            return fut
        ref._dirty = False
        fut = loop.create_future()
        p.waiters.append(fut)
        self._enqueue(ref, p)
        return fut

    def _enqueue(self, ref: AgentRef, p: _Pending) -> None:
        """Queue ``ref`` once, and schedule a flush: the next loop iteration ("turn") or
        ``interval`` seconds from now (write-behind)."""
        if not p.queued:
            p.queued = True
            self.queue.append(ref)
        if self._scheduled is None:
            loop = asyncio.get_running_loop()
            if self.interval is None:
                self._scheduled = loop.call_soon(self._flush)
            else:
                self._scheduled = loop.call_later(self.interval, self._flush)

    # -- flushing ---------------------------------------------------------------------------

    def _flush(self, *, closing: bool = False) -> None:
        """Start a batch write of every queued ref with no write in flight (at most
        ``_IN_FLIGHT`` batches at once; the rest wait for the next flush). ``closing``: close's
        own flush, which runs while the manager is no longer open."""
        self._scheduled = None
        if not self.queue or not (closing or self.core.is_open):
            return
        refs, keep = [], []
        for ref in self.queue:
            x = ref._x
            if x is not None and x.writing is not None:
                keep.append(ref)  # one write per ref in flight: the next flush takes it
            else:
                refs.append(ref)
        self.queue = keep
        for ref in refs:
            _pending(ref).queued = False
        if refs:
            if len(self._in_flight) >= _IN_FLIGHT:
                self.queue.extend(refs)  # back in line; a landing batch flushes again
                for ref in refs:
                    _pending(ref).queued = True
            else:
                task = self.core.spawn(self._write(refs))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _write(self, refs: list[AgentRef]) -> None:
        """Write one batch: one ``save_batch``, then settle each ref's waiting callers."""
        core = self.core
        io = core.io
        loop = asyncio.get_running_loop()
        if not self.per_turn:
            refs = await self._encode_at_boundaries(refs)
        items: list[SaveItem] = []
        dues: list[float | None] = []
        batch: list[tuple[AgentRef, _Pending, int, bytes, list[asyncio.Future[None]]]] = []
        for ref in refs:
            p = _pending(ref)
            waiters, p.waiters = p.waiters, []
            if ref._status is not RUNNING or p.data is None:
                if p.data is None:
                    # nothing new to write: durable when what was queued before has landed
                    landed = ref._digest == p.digest
                    _settle(waiters, None if landed else StorageError(
                        f"the state of key {ref.key!r} was not written: an earlier write failed"))
                else:
                    _settle(waiters, AgentStopped(f"{ref!r} stopped before its state was written"))
                continue
            x = ref._rare()
            x.writing = loop.create_future()
            items.append(SaveItem(io.key(ref), p.data, ref._version))
            dues.append(p.due)
            batch.append((ref, p, p.seq, p.digest or b"", waiters))
            p.data = None
        if items:
            results = await io.save_batch(items, dues if any(d is not None for d in dues) else None)
            core.counters["writes"] += len(items)
            for (ref, p, seq, d, waiters), item, due, result in zip(batch, items, dues, results, strict=True):
                if isinstance(result, ConflictError) and not isinstance(result, LeaseLost):
                    result = await io.resave_after_lost_reply(ref, item, result, due)
                x = ref._rare()
                writing, x.writing = x.writing, None
                if not isinstance(result, BaseException):
                    ref.written(result, d)
                    _settle(waiters, None)
                else:
                    if isinstance(result, LeaseLost):
                        if core.lease is not None:
                            core.lease.lost(result)
                    elif not isinstance(result, ConflictError):
                        io.remember_unsure(ref, seq)
                    ref._dirty = True  # the next write (a turn, the hibernate) carries it
                    p.digest = ref._digest
                    logger.warning("keyhive: %s: write of key %r failed; the state stays in memory "
                                   "and the next write carries it: %r", core.name, ref.key, result)
                    _settle(waiters, result if isinstance(result, StorageError) else storage_error(result))
                if writing is not None and not writing.done():
                    writing.set_result(None)
        if self.queue and self._scheduled is None:
            self._scheduled = loop.call_soon(self._flush) if self.interval is None else \
                loop.call_later(self.interval, self._flush)

    async def _encode_at_boundaries(self, refs: list[AgentRef]) -> list[AgentRef]:
        """Write-behind: encode each ref's state between turns. A ref whose turn is free is
        at a turn boundary now (nothing else runs until we await): encoded at once; only
        the busy ones wait for their turn."""
        out: list[AgentRef] = []
        busy: list[AgentRef] = []
        for ref in refs:
            if ref._status is not RUNNING:
                continue
            if ref._busy:
                busy.append(ref)
            else:
                self._encode_now(ref, out)

        async def when_free(ref: AgentRef) -> None:
            try:
                await ref._acquire()
            except AgentStopped:
                return
            try:
                if ref._status is RUNNING:
                    self._encode_now(ref, out)
            finally:
                ref._release()

        if busy:
            await asyncio.gather(*(when_free(ref) for ref in busy))
        return out

    def _encode_now(self, ref: AgentRef, out: list[AgentRef]) -> None:
        """Encode ``ref``'s state (at a turn boundary) for the next write, when it changed."""
        io = self.core.io
        agent = ref._agent
        if not ref._dirty or agent is None:
            return
        try:
            payload, meta, due, d = io.encode_state(ref, agent)
            p = _pending(ref)
            if d == p.digest and ref._version is not None:
                ref._dirty = False
                return
            p.data, p.seq = io.envelope(agent, payload, meta)
            p.digest, p.due = d, due
            ref._dirty = False  # only now: a failed encode leaves the state for the hibernate
            out.append(ref)
        except Exception as exc:  # noqa: BLE001  # a codec error is the agent's; hibernate reports it
            logger.warning("keyhive: %s: write-behind of key %r skipped: %r", self.core.name, ref.key, exc)

    async def settle(self) -> None:
        """Write what is queued now and wait for every batch in flight (close, tests)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        while self.queue or self._in_flight:
            if self.queue and len(self._in_flight) < _IN_FLIGHT:
                self._flush(closing=True)  # close's settle: the manager is no longer open
            if self._in_flight:
                await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
            elif self.queue:
                await asyncio.sleep(0)


def _settle(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in waiters:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
            fut.exception()  # a caller that left does not make it a lost error


def _stopped_during_turn(ref: AgentRef) -> StorageError:
    """The answer to a turn whose incarnation stopped while it ran: its state is not written."""
    reason = ref.stop_reason
    if reason is StopReason.LEASE_LOST:
        return LeaseLost(f"{ref!r} lost its lease during this turn: its state was not written "
                         f"(another process owns the key now)")
    return StorageError(f"{ref!r} stopped ({reason}) during this turn: its state was not written")


def stopped(ref: AgentRef, saved: bool) -> None:
    """``ref`` stopped: callers waiting for durability learn whether the stop wrote it."""
    x = ref._x
    p: Any = None if x is None else x.commit
    if p is None or not p.waiters:
        return
    waiters, p.waiters = p.waiters, []
    p.data = None
    _settle(waiters, None if saved else StorageError(f"{ref!r} stopped without writing its state"))


async def checkpoint_now(core: Core, ref: AgentRef) -> None:
    """``await self.checkpoint()``: write the state now (inside the agent's turn).

    Nothing is written when the state is what was last written.

    Raises:
        StorageError, ConflictError, CodecError: the write failed; the state stays in memory.
    """
    io = core.io
    if io.storage is None:
        return
    agent = ref._agent
    if agent is None:  # stopped during this turn (its lease was lost): it writes nothing more
        raise _stopped_during_turn(ref)
    x = ref._rare()
    while x.writing is not None:
        await asyncio.wait([x.writing])
    payload, meta, due, d = io.encode_state(ref, agent)
    p = x.commit
    if d == ref._digest and ref._version is not None:
        ref._dirty = False
        return
    data, seq = io.envelope(agent, payload, meta)
    item = SaveItem(io.key(ref), data, ref._version)
    x.writing = asyncio.get_running_loop().create_future()
    try:
        result = (await io.save_batch([item], None if due is None else [due]))[0]
        core.counters["writes"] += 1
        if isinstance(result, ConflictError) and not isinstance(result, LeaseLost):
            result = await io.resave_after_lost_reply(ref, item, result, due)
    finally:
        writing, x.writing = x.writing, None
        writing.set_result(None)
    if isinstance(result, BaseException):
        if isinstance(result, LeaseLost) and core.lease is not None:
            core.lease.lost(result)
        elif not isinstance(result, ConflictError):
            io.remember_unsure(ref, seq)
        raise result
    ref.written(result, d)
    ref._dirty = False
    if p is not None:
        p.digest = d
        if p.data is not None:
            p.data = None  # older than what just landed
            waiters, p.waiters = p.waiters, []
            _settle(waiters, None)

"""AgentRef: the handle callers hold, and the per-incarnation runtime behind it: the turn.

One ``AgentRef`` object exists per incarnation, so ``get`` of a live key allocates
nothing. It carries the turn (one message at a time, FIFO hand-off, no task and no
queue while idle) and the lifecycle (:mod:`keyhive._lifecycle`). Callers never see the
``Agent`` object; everything goes through these methods, which is what lets another
runtime serve the same handle from another process. What a ref needs from the manager
that hosts it is the small :class:`RefHost` protocol.

**Turns run to completion** (SPEC §8). A ``call`` starts the handler coroutine by hand
in the caller's task: when it finishes without suspending (a counter, a dict update) it
returns with no task, timer or lock. When it suspends, the rest of the turn is handed to
a task of the manager's and the caller waits for its reply with its own timeout: a
caller that times out or is cancelled stops waiting, and the turn goes on. A message
whose caller gave up while it was queued is still handled in its turn.

**Re-entrancy is an error.** A call that would have to wait for a turn held further up
its own call chain raises :class:`~keyhive.ReentrancyError` at once. The chain is found
only then: from the frames of the running task (turns held by a handler running in it)
and a context variable set when a turn moves to a task of its own (turns held by the
callers waiting on it). The fast path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import logging
import sys
import types
from collections import deque
from collections.abc import Coroutine, Generator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import AgentStopped, ReentrancyError
from ._events import EventKind, StopReason
from ._lifecycle import RUNNING, STOP_NOW, STOPPED, STOPPING, Lifecycle

if TYPE_CHECKING:
    from ._agent import Agent
    from ._commit import Committer
    from ._hibernation import Reaper
    from ._timer import DeadlineWheel

__all__ = ["AgentRef", "RefHost"]

logger = logging.getLogger("keyhive")

# Refs whose turns are held by the callers of the turn running in this task (see above).
_CHAIN: contextvars.ContextVar[tuple[AgentRef, ...]] = contextvars.ContextVar("keyhive_turn_chain",
                                                                              default=())
_BASE_CONTEXT = contextvars.Context()  # manager tasks start from a copy: no caller's chain


class RefHost(Protocol):
    """What an :class:`AgentRef` needs from the manager that hosts it."""

    name: str
    agent_opts: Mapping[str, Any]
    idle_timeout: float | None
    calls_touch: bool
    turn_flags: int  # nonzero: calls take _run_held (calls_touch, isolate_turns)
    isolate_turns: bool
    turn_timeout: float | None
    validate_state: bool
    wheel: DeadlineWheel
    reaper: Reaper
    committer: Committer | None
    listeners: tuple[Any, ...]
    tasks: set[asyncio.Task[Any]]

    def emit(self, kind: EventKind, ref: AgentRef, reason: StopReason | None = None,
             error: BaseException | None = None) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...


class _Cast:
    """A queued cast: handled in its turn by a task of the manager's."""

    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message = message


class _Call:
    """A queued call: ``fut`` is set when its turn comes; if its caller left by then,
    the message is handled all the same (it was sent)."""

    __slots__ = ("fut", "message")

    def __init__(self, message: Any, fut: asyncio.Future[None]) -> None:
        self.message = message
        self.fut = fut


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on running a coroutine that was started by hand and suspended on ``yielded``.

    A bare yield (``await asyncio.sleep(0)``: "let the others run once") is answered at
    once: this runs in a new task's first step, one loop iteration later already.
    """
    if yielded is None:
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # noqa: BLE001  # every exception goes on into the coroutine, as Task.__step does
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


class AgentRef(Lifecycle):
    """A handle on one incarnation of one key's agent.

    Two refs are equal only when they name the same incarnation: after the agent stops
    and starts again, ``get`` returns a ref that is not equal to the old one.
    """

    # _used: the max_live clock's bit (see _bounds.py). _digest: of the state last written or
    # thawed (a slot, not in Rare: a thaw then makes no Rare record; 13 -> 14 slots keeps the
    # object in pymalloc's 144-byte size class, so it costs no memory)
    __slots__ = ("_agent", "_busy", "_digest", "_dirty", "_host", "_key", "_partition", "_used", "_version")

    def __init__(self, host: RefHost, key: Any, partition: Any) -> None:
        # Lifecycle.__init__, inlined (hot: one per activation)
        self._status = 0  # STARTING
        self._owners = self._deadline = self._armed = self._x = None
        self._host = host
        self._key = key
        self._partition = partition
        self._agent: Agent | None = None
        self._busy = False
        self._dirty = False  # a turn ran since the state was last written or thawed
        self._version: int | None = None
        self._digest: bytes | None = None
        self._used = False  # a get or call since max_live's clock hand last passed

    # -- identity -------------------------------------------------------------------

    @property
    def key(self) -> Any:
        """The key this incarnation serves."""
        return self._key

    @property
    def partition(self) -> Any:
        """The key's partition (``None`` when none)."""
        return self._partition

    @property
    def manager(self) -> str:
        """The name of the manager that runs it."""
        return self._host.name

    @property
    def alive(self) -> bool:
        """True until this incarnation has stopped."""
        return self._status is not STOPPED

    def __repr__(self) -> str:
        state = {0: "starting", RUNNING: "running", STOPPING: "stopping"}.get(
            self._status, f"stopped:{self.stop_reason}"
        )
        part = "" if self._partition is None else f" partition={self._partition!r}"
        return f"<AgentRef {self._host.name}:{self._key!r}{part} {state} at {id(self):#x}>"

    def _stopped_error(self) -> AgentStopped:
        return AgentStopped(f"{self!r} has stopped")

    # -- messages -------------------------------------------------------------------

    async def call(self, message: Any, *, timeout: float | None = 5.0) -> Any:
        """Run ``handle(message)`` in the agent's turn and return its result.

        The turn runs to completion even when this caller stops waiting.

        Raises:
            AgentStopped: this incarnation has stopped (also while the call was queued).
            TimeoutError: no result within ``timeout`` seconds (``None``: wait forever).
            ReentrancyError: the call would wait for a turn held up its own call chain.
            Exception: whatever ``handle`` raised; the agent keeps running.
        """
        self._used = True  # a call is a use (max_live's clock): one store
        if self._busy or self._status is not RUNNING:
            return await self._call_queued(message, timeout)
        self._busy = True
        host = self._host
        if host.turn_flags:  # calls_touch, or turns in a context of their own (one check for both)
            return await self._run_held(message, timeout)
        coro = self._agent.handle(message)  # type: ignore[union-attr]
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            self._dirty = True
            if host.committer is None and not host.validate_state:
                self._release()
                return done.value
            return await self._end_turn(done.value, None)
        except BaseException as exc:
            self._dirty = True
            if host.committer is None and not host.validate_state:
                self._release()
                raise
            return await self._end_turn(None, exc)
        return await self._hand_off(coro, yielded, timeout)

    async def _end_turn(self, result: Any, error: BaseException | None) -> Any:
        """A turn ended in the caller's task, with a checkpoint policy or validation on."""
        error = await self._close_turn(error)
        if error is not None:
            raise error
        return result

    async def _close_turn(self, error: BaseException | None) -> BaseException | None:
        """End a turn whose handler finished (``error``: what it raised): validate the state
        (``validate_state``), queue its write (checkpoint policies), release the turn, and
        wait until the write is durable (``"turn"``). Returns the turn's error: the
        handler's, else the validation's, else the write's."""
        host = self._host
        durable = None
        try:
            self._dirty = True
            if host.validate_state and error is None:
                try:
                    self._validate()
                except Exception as exc:  # noqa: BLE001  # validate_state: the encode error is the turn's
                    error = exc
            if host.committer is not None:
                durable = host.committer.turn_ended(self)
        finally:
            self._release()
        if durable is not None:
            try:
                await durable
            except Exception as exc:  # noqa: BLE001  # a failed durable write is the turn's error
                if error is None:
                    error = exc
        return error

    def _validate(self) -> None:
        """``validate_state=True``: the handler that left an unencodable state fails."""
        host: Any = self._host
        host.io.encode_payload(self._agent)

    async def _hand_off(self, coro: Coroutine[Any, Any, Any], yielded: Any,
                        timeout: float | None, ctx: contextvars.Context | None = None) -> Any:
        """The handler suspended: finish its turn in a task of the manager's; wait for it."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        # The turns held up this call chain, above our own frames (the new task's own frames
        # name this ref): usually none, and then the task needs no context of its own.
        outer = [r for r in _held_chain(sys._getframe(2)) if r is not self]  # noqa: SLF001  # off the fast path
        if outer:
            if ctx is None:
                ctx = contextvars.copy_context()
            ctx.run(_CHAIN.set, (*outer, self))
        if ctx is not None:
            task = loop.create_task(self._finish_turn(coro, yielded, waiter), context=ctx)
        else:
            task = loop.create_task(self._finish_turn(coro, yielded, waiter))
        tasks = self._host.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if timeout is None:
            return await waiter
        # A timer that fails the waiter: cheaper than asyncio.timeout (no cancel/uncancel of
        # the caller's task), and the turn itself is never touched by it.
        handle = loop.call_later(timeout, _time_out, waiter, timeout)
        try:
            return await waiter
        finally:
            handle.cancel()

    async def _finish_turn(self, coro: Coroutine[Any, Any, Any], yielded: Any,
                           waiter: asyncio.Future[Any] | None) -> None:
        """Run the rest of a handed-off turn; reply to the caller if it still waits."""
        host = self._host
        result: Any = None
        error: BaseException | None = None
        try:
            if host.turn_timeout is None:
                result = await _resume(coro, yielded)
            else:
                try:
                    async with asyncio.timeout(host.turn_timeout):
                        result = await _resume(coro, yielded)
                except TimeoutError:
                    logger.error("keyhive: %s: the turn of key %r ran over turn_timeout=%ss and was "
                                 "cancelled; the agent keeps its state as the handler left it",
                                 host.name, self._key, host.turn_timeout)
                    raise
        except BaseException as exc:  # noqa: BLE001  # whatever the handler raised is its caller's answer
            error = exc
        error = await self._close_turn(error)
        if waiter is None or waiter.done():  # the caller left (or this is a cast)
            if isinstance(error, Exception):
                logger.error("keyhive: %s: %s to key %r failed after its caller left: %r",
                             host.name, "cast" if waiter is None else "call", self._key, error,
                             exc_info=error)
            return
        if error is None:
            waiter.set_result(result)
        elif isinstance(error, asyncio.CancelledError):
            waiter.set_exception(TimeoutError(f"the turn of key {self._key!r} was cancelled"))
        else:
            waiter.set_exception(error)

    async def _call_queued(self, message: Any, timeout: float | None) -> Any:
        """The agent is busy (or not running): queue the message and wait for its turn."""
        if self._status is STOPPED:
            raise self._stopped_error()
        if self._busy:
            _check_reentrancy(self, sys._getframe(2))  # noqa: SLF001  # above call(), our only caller
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        entry = _Call(message, loop.create_future())
        self._queue().append(entry)
        # the wait's timeout fails the entry itself (a plain timer, as in _hand_off): the
        # message stays queued and is handled in its turn all the same
        handle = None if deadline is None else loop.call_at(deadline, _time_out, entry.fut, timeout)
        try:
            await entry.fut
        except BaseException:
            fut = entry.fut
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # The turn was handed to us as we left: the message is handled all the same.
                self._spawn_turn(self._run_cast(message, queued=True))
            elif not fut.done():
                fut.cancel()  # _release finds it done and handles the message without us
            raise
        finally:
            if handle is not None:
                handle.cancel()
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        return await self._run_held(message, remaining)

    async def _run_held(self, message: Any, timeout: float | None) -> Any:
        """Run ``handle(message)`` in the turn we hold (off the fast path: a queued call, or
        ``calls_touch``, or turns that run in a context of their own).

        With ``isolate_turns`` (set by instrumentation such as OpenTelemetry) the handler
        runs in a copy of the caller's context from its first step on, and a suspended
        handler goes on in that same context: a context variable set before an ``await``
        can be reset after it (``with span: await ...``), and nothing leaks to the caller.
        """
        host = self._host
        if host.calls_touch:
            self.touch()
        coro = self._agent.handle(message)  # type: ignore[union-attr]
        ctx = contextvars.copy_context() if host.isolate_turns else None
        try:
            yielded = coro.send(None) if ctx is None else ctx.run(coro.send, None)
        except StopIteration as done:
            self._dirty = True
            return await self._end_turn(done.value, None)
        except BaseException as exc:  # noqa: BLE001  # whatever the handler raised is its caller's answer
            self._dirty = True
            return await self._end_turn(None, exc)
        return await self._hand_off(coro, yielded, timeout, ctx)

    async def cast(self, message: Any) -> None:
        """Queue ``message`` for ``handle`` and return at once.

        An exception raised by ``handle`` is logged with the key.

        Raises:
            AgentStopped: this incarnation has stopped.
        """
        if self._status is STOPPED:
            raise self._stopped_error()
        if self._host.calls_touch:
            self.touch()
        if self._busy:
            self._queue().append(_Cast(message))
        else:
            self._busy = True
            self._spawn_turn(self._run_cast(message))

    def _spawn_turn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a turn in a task of the manager's, with no caller's chain in its context."""
        task = asyncio.get_running_loop().create_task(coro, context=_BASE_CONTEXT.copy())
        tasks = self._host.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run_cast(self, message: Any, *, queued: bool = False) -> None:
        """Handle a cast, or a call whose caller left, in this task's turn (held already)."""
        agent = self._agent
        if agent is None:  # stopped meanwhile
            self._release()
            return
        coro = agent.handle(message)
        try:
            yielded = coro.send(None)
        except StopIteration:
            await self._finish_done(None, queued)
            return
        except BaseException as exc:  # noqa: BLE001  # whatever the handler raised is logged with the key
            await self._finish_done(exc, queued)
            return
        await self._finish_turn(coro, yielded, None)

    async def _finish_done(self, error: BaseException | None, queued: bool) -> None:
        """A cast (or an orphaned call) whose handler finished without suspending: end the turn."""
        host = self._host
        error = await self._close_turn(error)
        if isinstance(error, Exception):
            logger.error("keyhive: %s: %s to key %r failed: %r", host.name,
                         "call whose caller left" if queued else "cast", self._key, error, exc_info=error)

    async def state(self) -> Any:
        """A deep copy of the agent's state, taken in the agent's turn.

        Raises:
            AgentStopped: this incarnation has stopped.
            ReentrancyError: asked from a turn up this call chain (use ``self.state`` there).
        """
        if self._status is STOPPED:
            raise self._stopped_error()
        await self._acquire()
        try:
            return copy.deepcopy(self._agent.state)  # type: ignore[union-attr]
        finally:
            self._release()

    # -- the turn ---------------------------------------------------------------------

    def _queue(self) -> deque[Any]:
        x = self._rare()
        waiters: deque[Any] | None = x.waiters
        if waiters is None:
            waiters = x.waiters = deque()
        return waiters

    async def _acquire(self) -> None:
        """Wait for the turn (FIFO).

        Raises:
            AgentStopped: the agent stopped meanwhile.
            ReentrancyError: the turn is held up this task's own call chain.
        """
        if not self._busy:
            if self._status is STOPPED:
                raise self._stopped_error()
            self._busy = True
            return
        _check_reentrancy(self, sys._getframe(1))  # noqa: SLF001  # the caller's frame
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue().append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release()  # the turn was handed to us as we left: pass it on
            raise

    def _release(self) -> None:
        """End the current turn: hand it to the next waiter, or free it."""
        x = self._x
        if x is None:  # the common case: nothing queued, no stop asked
            self._busy = False
            return
        if x.stop_req is not None and self._status is RUNNING and self._host.reaper.self_stop(self):
            return  # the turn is kept for the hibernate
        waiters = x.waiters
        while waiters:
            item = waiters.popleft()
            kind = type(item)
            if kind is _Cast:
                self._spawn_turn(self._run_cast(item.message))
                return
            if kind is _Call:
                if item.fut.done():  # its caller left: the message is handled all the same
                    self._spawn_turn(self._run_cast(item.message, queued=True))
                else:
                    item.fut.set_result(None)
                return
            if not item.done():
                item.set_result(None)
                return
        x.waiters = None
        self._busy = False

    def _fail_waiters(self) -> None:
        """The incarnation stopped: every queued caller gets AgentStopped (never stranded)."""
        x = self._x
        waiters = None if x is None else x.waiters
        if not waiters:
            return
        assert x is not None
        x.waiters = None
        dropped = 0
        for item in waiters:
            kind = type(item)
            if kind is _Cast:
                dropped += 1
                continue
            fut = item.fut if kind is _Call else item
            if not fut.done():
                fut.set_exception(self._stopped_error())
        if dropped:
            logger.warning("keyhive: %s: key %r stopped with %d queued casts unhandled",
                           self._host.name, self._key, dropped)

    # -- changes of status --------------------------------------------------------------

    async def _changed(self) -> None:
        """Wait for the next change of status (raises the error of a failed start)."""
        x = self._rare()
        fut = x.change
        if fut is None:
            fut = x.change = asyncio.get_running_loop().create_future()
        await asyncio.shield(fut)

    def notify(self, error: BaseException | None = None) -> None:
        """Wake whoever waits for a change of status (``get`` of a starting/stopping key)."""
        x = self._x
        fut = None if x is None else x.change
        if fut is not None:
            x.change = None  # type: ignore[union-attr]
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
                fut.exception()  # waiters may all have been cancelled: not a lost error

    async def wait_stopped(self) -> StopReason:
        """Wait until this incarnation has stopped; return why."""
        while self._status is not STOPPED:
            # a failed start also ends the incarnation; its error went to its get()
            with contextlib.suppress(Exception):
                await self._changed()
        reason = self.stop_reason
        assert reason is not None
        return reason  # type: ignore[no-any-return]

    def stopped(self, reason: StopReason) -> None:
        """The incarnation has stopped (its checkpoint written, or given up): let go of
        owners, fail queued callers, wake waiters. The turn is free afterwards."""
        for owner in self.finished(reason):
            if isinstance(owner, asyncio.Task):
                owner.remove_done_callback(self._owner_done)
        self._agent = None
        self._fail_waiters()
        self._busy = False
        x = self._x
        if x is not None and x.subscribers:
            from ._pubsub import end_subscribers

            end_subscribers(self, reason)
        self.notify()

    def written(self, version: int, digest: bytes) -> None:
        """A write of this incarnation landed as ``version`` (its payload's ``digest``)."""
        self._version = version
        self._digest = digest
        x = self._x
        if x is not None:
            x.unsure = None

    def _request_stop(self, reason: StopReason) -> None:
        """``agent.stop()``: begin now when the turn is free, else when it ends."""
        if self.request_stop(reason, self._busy) is STOP_NOW:
            self._busy = True
            self._release()

    def request_stop_now(self, reason: StopReason) -> None:
        """Ask for a stop from outside a turn (a retried self-stop)."""
        self._request_stop(reason)

    # -- attachments and idle ------------------------------------------------------------

    async def attach(self, owner: object = None) -> None:
        """Attach ``owner`` (default: the current task) and cancel the idle timer.

        Idempotent per owner. A task owner is detached automatically when it finishes.

        Raises:
            AgentStopped: this incarnation has stopped.
        """
        if self._status is STOPPED:
            raise self._stopped_error()
        if owner is None:
            owner = _current_task("attach")
        if self.attached(owner):
            if isinstance(owner, asyncio.Task):
                owner.add_done_callback(self._owner_done)
            host = self._host
            if host.listeners:
                host.emit(EventKind.ATTACHED, self)

    async def detach(self, owner: object = None) -> None:
        """Detach ``owner`` (default: the current task); not attached: nothing happens.

        When the last owner leaves, a fresh full idle timer starts.
        """
        if owner is None:
            owner = _current_task("detach")
        if self._detach(owner) and isinstance(owner, asyncio.Task):
            owner.remove_done_callback(self._owner_done)

    def _owner_done(self, task: asyncio.Task[Any]) -> None:
        self._detach(task)

    def _detach(self, owner: object) -> bool:
        """Remove ``owner``; a last one gone re-arms the idle timer. True when it was attached."""
        if self._status is STOPPED:
            return False
        host = self._host
        wheel = host.wheel
        if not self.detached(owner, wheel.now(), host.idle_timeout):
            return False
        deadline = self._deadline
        if deadline is not None:
            wheel.arm(self, deadline)
        if host.listeners:
            host.emit(EventKind.DETACHED, self)
        return True

    def touch(self) -> None:
        """Restart the idle timer when nothing is attached; otherwise do nothing."""
        if self._status is not RUNNING:
            return
        host = self._host
        wheel = host.wheel
        if self.touched(wheel.now(), host.idle_timeout):
            wheel.arm(self, self._deadline)  # type: ignore[arg-type]

    # -- events ---------------------------------------------------------------------------

    def subscribe(self, *, snapshot: bool = False) -> Any:
        """``async with ref.subscribe() as events``: the events this incarnation publishes.

        Attached (like an owner) while open. With ``snapshot=True`` the stream starts with
        ``events.snapshot``, a copy of the state at a turn boundary, and then every event
        published after it: no gap, no duplicate. Iteration ends when the incarnation
        stops (``events.stop_reason`` says why) and raises
        :class:`~keyhive.SubscriberOverflow` for a subscriber that fell more than
        ``subscriber_buffer`` events behind.
        """
        from ._pubsub import subscribe

        return subscribe(self, snapshot=snapshot)


def _time_out(waiter: asyncio.Future[Any], timeout: float | None) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no reply within {timeout}s (the turn goes on)"))


def _current_task(what: str) -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError(f"{what}() without an owner must run inside an asyncio task")
    return task


# Frames whose ``self`` holds its turn while they are on the running task's stack.
_TURN_CODES = frozenset({
    AgentRef.call.__code__,
    AgentRef._call_queued.__code__,  # noqa: SLF001  # this module's own class
    AgentRef._run_held.__code__,  # noqa: SLF001
    AgentRef._run_cast.__code__,  # noqa: SLF001
    AgentRef._finish_turn.__code__,  # noqa: SLF001
})


def _held_chain(frame: types.FrameType | None) -> list[AgentRef]:
    """The refs whose turns are held by ``frame`` and its callers, and by the callers
    waiting on this task's turn (the context variable), outermost first."""
    refs: list[AgentRef] = []
    while frame is not None:
        if frame.f_code in _TURN_CODES:
            ref = frame.f_locals.get("self")
            if isinstance(ref, AgentRef) and ref not in refs:
                refs.append(ref)
        frame = frame.f_back
    refs.reverse()
    outer = _CHAIN.get()
    return [*outer, *(r for r in refs if r not in outer)]


def _check_reentrancy(ref: AgentRef, frame: types.FrameType | None) -> None:
    """Raise ReentrancyError when ``ref``'s turn is held by ``frame``'s call chain."""
    chain = _held_chain(frame)
    if ref in chain:
        keys = [r.key for r in chain[chain.index(ref):]] + [ref.key]
        shown = " -> ".join(repr(k) for k in keys)
        raise ReentrancyError(
            f"re-entrant call in manager {ref.manager!r}: {shown} would wait for a turn that this "
            f"call chain already holds (a deadlock); use self.state / self.stop() inside the agent, "
            f"or cast instead of call", keys,
        )

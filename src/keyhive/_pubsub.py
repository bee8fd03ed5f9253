"""Publish/subscribe per incarnation (SPEC §12): ``self.publish(event)``, ``ref.subscribe()``.

``publish`` appends the event to every subscriber's buffer, in publish order, in the
publishing turn: no task per subscriber and no await in the agent. A subscriber that is
more than ``subscriber_buffer`` events behind is dropped at once (its iteration raises
:class:`~keyhive.SubscriberOverflow`); the agent and the others never wait for it. A
subscription is an owner of the agent while it is open (the agent does not idle out),
and its iteration ends when the incarnation stops.

``subscribe(snapshot=True)`` registers the subscriber inside the agent's turn and copies
the state there, so ``events.snapshot`` is the state at a turn boundary and the stream
holds exactly the events published after it.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from typing import TYPE_CHECKING, Any

from ._errors import AgentStopped, SubscriberOverflow

if TYPE_CHECKING:
    from ._events import StopReason
    from ._ref import AgentRef

__all__ = ["Subscription", "end_subscribers", "publish", "subscribe"]

_NO_SNAPSHOT: Any = object()


class Subscription:
    """``async with ref.subscribe() as events: async for event in events: ...``."""

    __slots__ = (
        "_entered",
        "_events",
        "_limit",
        "_overflowed",
        "_ref",
        "_waiter",
        "_want_snapshot",
        "snapshot",
        "stop_reason",
    )

    def __init__(self, ref: AgentRef, *, snapshot: bool, limit: int) -> None:
        self._ref = ref
        self._want_snapshot = snapshot
        self._limit = limit
        self._events: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._overflowed = False
        self._entered = False
        self.snapshot: Any = _NO_SNAPSHOT if snapshot else None
        self.stop_reason: StopReason | None = None  # set when the incarnation stopped

    def __repr__(self) -> str:
        return f"<Subscription to {self._ref!r}, {len(self._events)} buffered>"

    @property
    def ended(self) -> bool:
        """Whether the stream has ended (the incarnation stopped, or this subscriber overflowed)."""
        return self.stop_reason is not None or self._overflowed

    async def __aenter__(self) -> Subscription:
        ref = self._ref
        if self._entered:
            raise RuntimeError(f"{self!r} was entered already: call ref.subscribe() for another one")
        self._entered = True
        await ref.attach(self)
        if not self._want_snapshot:
            _add(ref, self)  # attach raised AgentStopped if it had stopped
            return self
        try:
            await ref._acquire()  # the snapshot and the registration happen in one turn
        except BaseException:
            # stopped or cancelled while waiting for the turn: leave no owner behind
            await ref.detach(self)
            raise
        try:
            agent = ref._agent
            if agent is None:  # pragma: no cover - a held turn of a stopped agent
                raise AgentStopped(f"{ref!r} has stopped")
            self.snapshot = copy.deepcopy(agent.state)
            _add(ref, self)
        except BaseException:
            ref._release()
            await ref.detach(self)
            raise
        ref._release()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        _remove(self._ref, self)
        await self._ref.detach(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Any:
        while True:
            events = self._events
            if events:
                return events.popleft()
            if self._overflowed:
                raise SubscriberOverflow(
                    f"subscriber of {self._ref!r} fell more than {self._limit} events behind and was "
                    f"dropped (raise subscriber_buffer, or consume faster)"
                )
            if self.stop_reason is not None:
                raise StopAsyncIteration
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    @property
    def overflowed(self) -> bool:
        """Whether this subscriber fell more than ``subscriber_buffer`` events behind (dropped)."""
        return self._overflowed

    # -- for runtimes that forward a subscription elsewhere (the Ray shard host) ---------

    def take(self) -> list[Any]:
        """Everything buffered, in order, now (and nothing is left buffered)."""
        events = list(self._events)
        self._events.clear()
        return events

    def watch(self, fut: asyncio.Future[None]) -> None:
        """Resolve ``fut`` when an event is buffered or the stream ends (at once if so).

        One future may watch many subscriptions: the first of them to have news resolves it.
        Not for a subscription that is also iterated (``__anext__`` has its own waiter).
        """
        if self._events or self.ended:
            if not fut.done():
                fut.set_result(None)
        else:
            self._waiter = fut

    def unwatch(self, fut: asyncio.Future[None]) -> None:
        """Stop resolving ``fut`` (set by :meth:`watch`)."""
        if self._waiter is fut:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _add(ref: AgentRef, sub: Subscription) -> None:
    x = ref._rare()
    subs = x.subscribers
    x.subscribers = [*(subs or ()), sub]  # replaced, never mutated: publish iterates without a copy


def _remove(ref: AgentRef, sub: Subscription) -> None:
    x = ref._x
    if x is None or not x.subscribers or sub not in x.subscribers:
        return
    x.subscribers = [s for s in x.subscribers if s is not sub] or None


def subscribe(ref: AgentRef, *, snapshot: bool) -> Subscription:
    """A subscription to ``ref``'s events (enter it with ``async with``)."""
    host: Any = ref._host
    return Subscription(ref, snapshot=snapshot, limit=host.options.subscriber_buffer)


def publish(ref: AgentRef, event: Any) -> None:
    """Deliver ``event`` to every subscriber of ``ref``, in order; drop the ones that overflow."""
    x = ref._x
    subs = None if x is None else x.subscribers
    if not subs:
        return
    dropped = None
    for sub in subs:
        events = sub._events
        events.append(event)
        if len(events) > sub._limit:
            sub._overflowed = True
            events.clear()
            dropped = [*(dropped or ()), sub]
        if sub._waiter is not None:
            sub._wake()
    if dropped:
        for sub in dropped:
            _remove(ref, sub)
            sub._wake()


def end_subscribers(ref: AgentRef, reason: StopReason) -> None:
    """The incarnation stopped: every subscriber's iteration ends after what it buffered."""
    x = ref._x
    subs = None if x is None else x.subscribers
    if not subs:
        return
    assert x is not None
    x.subscribers = None
    for sub in subs:
        sub.stop_reason = reason
        sub._wake()

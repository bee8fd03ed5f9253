"""Stop reasons and lifecycle events."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

__all__ = ["Event", "EventKind", "StopReason"]


class StopReason(enum.StrEnum):
    """Why an agent incarnation stopped."""

    IDLE_TIMEOUT = "idle_timeout"
    """Nothing was attached for ``idle_timeout``; the agent hibernated."""
    STOPPED = "stopped"
    """``manager.stop(key)``."""
    NORMAL = "normal"
    """The agent called ``self.stop()``."""
    SHUTDOWN = "shutdown"
    """The manager closed."""
    CONFLICT = "conflict"
    """Another incarnation wrote newer state; this one stopped without overwriting it."""
    UNSAVED = "unsaved"
    """The manager closed before this agent's state could be saved (see the close error)."""
    EVICTED = "evicted"
    """``max_live`` needed room: the least recently used unattached agent hibernated."""
    LEASE_LOST = "lease_lost"
    """Another process took over this manager's lease; the agent stopped without writing."""


class EventKind(enum.StrEnum):
    """What happened to an agent."""

    STARTED = "started"
    THAWED = "thawed"
    THAW_FAILED = "thaw_failed"
    ATTACHED = "attached"
    DETACHED = "detached"
    IDLE = "idle"
    HIBERNATED = "hibernated"
    HIBERNATE_FAILED = "hibernate_failed"
    STOPPED = "stopped"
    TIMER_FIRED = "timer_fired"
    """A durable timer's message was handled (``self.schedule``)."""
    TIMER_DROPPED = "timer_dropped"
    """A timer's handler kept failing past ``timer_retries``; ``error`` is the last failure."""


class Event(NamedTuple):
    """One lifecycle event, as passed to ``manager.subscribe`` callbacks (immutable).

    ``time`` is the event loop's clock; ``reason`` is set on ``stopped`` (and on
    ``idle``/``hibernated``/``hibernate_failed`` with the reason of the stop under way);
    ``error`` on ``thaw_failed``, ``hibernate_failed`` and ``timer_dropped``. A named tuple, because a busy
    manager makes several per agent stop and a tuple is the cheapest immutable record.
    """

    kind: EventKind
    manager: str
    key: Any
    partition: Any
    time: float
    reason: StopReason | None = None
    error: BaseException | None = None

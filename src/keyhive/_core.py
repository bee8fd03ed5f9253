"""What the parts of one manager share: options, registry, clock, events, tasks, counters.

:class:`~keyhive.InstanceManager` is the public door; this object is what its rooms
(the refs, hibernation, the drain, durable turns, the lease) hold on to. Its attributes
are plain so that the hot paths read them without a call; it decides nothing itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ._agent import Agent
from ._events import Event, EventKind, StopReason
from ._keys import check_key
from ._lifecycle import STARTING

if TYPE_CHECKING:
    from ._bounds import Evictor, Sweeper
    from ._checkpoint import CheckpointIO
    from ._commit import Committer
    from ._hibernation import Reaper
    from ._lease import LeaseKeeper
    from ._options import Options
    from ._ref import AgentRef
    from ._timer import DeadlineWheel
    from ._timers import TimerService

__all__ = ["CLOSED", "CLOSING", "NEW", "OPEN", "Core"]

logger = logging.getLogger("keyhive")

NEW, OPEN, CLOSING, CLOSED = "new", "running", "closing", "closed"

_new_event = tuple.__new__


class Core:
    """The shared internals of one manager (one object per manager)."""

    def __init__(self, name: str, agent: type[Agent], options: Options, io: CheckpointIO) -> None:
        self.name = name
        self.agent = agent
        self.options = options
        self.agent_opts = options.agent_opts
        self.idle_timeout = options.idle_timeout
        self.calls_touch = options.calls_touch
        self.isolate_turns = False  # see isolate(): set by instrumentation
        self.turn_flags = int(self.calls_touch)  # one check on the call fast path for both
        self.turn_timeout = options.turn_timeout
        self.validate_state = options.validate_state
        self.io = io
        self.state = NEW
        # hooks the agent class leaves as the base's no-ops are not run (no coroutine to make)
        self.runs_on_start = agent.on_start is not Agent.on_start
        self.runs_on_hibernate = agent.on_hibernate is not Agent.on_hibernate
        self.runs_on_stop = agent.on_stop is not Agent.on_stop
        self.custom_state = agent.initial_state is not Agent.initial_state or agent.state_type is not None
        self.regs: dict[Any, dict[Any, AgentRef]] = {}
        self.default_reg: dict[Any, AgentRef] = {}
        # a tuple, replaced on (un)subscribe: emitting iterates it without a copy
        self.listeners: tuple[Callable[[Event], None], ...] = ()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wheel: DeadlineWheel = None  # type: ignore[assignment]  # set by start()
        self.reaper: Reaper = None  # type: ignore[assignment]  # set by the manager
        self.committer: Committer | None = None  # checkpoint policies other than "idle"
        self.lease: LeaseKeeper | None = None
        self.timers: TimerService | None = None  # durable timers, set by start()
        self.evictor: Evictor | None = None  # max_live (see _bounds.py)
        self.sweeper: Sweeper | None = None  # checkpoint_ttl (see _bounds.py)
        self.counters = dict.fromkeys(
            ("started", "thawed", "hibernated", "hibernate_failures", "thaw_failures", "stopped",
             "evicted", "writes", "lease_lost"), 0
        )

    def isolate(self) -> None:
        """Run every call's handler in a context of its own from its first step on (see
        ``AgentRef._run_held``): what tracing needs; costs one context copy per call."""
        self.isolate_turns = True
        self.turn_flags = int(self.calls_touch) | 2

    @property
    def is_open(self) -> bool:
        """Whether the manager is running (not new, closing or closed)."""
        return self.state is OPEN

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task owned by the manager: close cancels and awaits what is left of them."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def emit(self, kind: EventKind, ref: AgentRef, reason: StopReason | None = None,
             error: BaseException | None = None) -> None:
        """Send one lifecycle event to every listener (callers check ``listeners`` first)."""
        loop = self.loop
        # tuple.__new__ skips the named tuple's Python-level __new__: a hibernate storm emits
        # three events per agent while a listener is subscribed
        event = _new_event(Event, (kind, self.name, ref._key, ref._partition,
                                   loop.time() if loop is not None else 0.0, reason, error))
        for callback in self.listeners:
            try:
                callback(event)
            except Exception:
                logger.exception("keyhive: %s: event callback %r failed", self.name, callback)

    def registry(self, partition: Any, *, create: bool) -> dict[Any, AgentRef] | None:
        """The registry of one partition (made when ``create``; ``None`` when it has none)."""
        reg = self.regs.get(partition)
        if reg is None:
            if partition is not None:
                check_key(partition, "partition")
            if create:
                reg = self.regs[partition] = {}
        return reg

    def unregister(self, ref: AgentRef) -> None:
        """Forget ``ref``'s key; an emptied registry of a partition other than the default
        is dropped, so one-shot tenants leave nothing behind."""
        partition, key = ref._partition, ref._key  # the slots: one per stopping agent of a storm
        reg = self.regs.get(partition)
        if reg is not None and reg.get(key) is ref:
            del reg[key]
            if self.evictor is not None:
                self.evictor.gone()
            if not reg and reg is not self.default_reg:
                del self.regs[partition]

    def live_refs(self) -> list[AgentRef]:
        """Every incarnation that has started (running or stopping), of every partition."""
        return [ref for reg in self.regs.values() for ref in reg.values() if ref._status is not STARTING]

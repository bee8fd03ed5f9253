"""One incarnation's lifecycle as a pure state machine: status, owners, deadline, stop request.

No clock, no loop, no I/O: every method takes ``now`` (and the idle timeout) as plain
numbers and says what the runtime must do. That keeps the rules of SPEC §4 testable
with a table of events:

* a new incarnation has no owners, so its deadline is ``now + timeout`` at once;
* ``attach`` clears the deadline; ``detach`` of the last owner sets a fresh full one;
* ``touch`` restarts the deadline only while nothing is attached;
* calls and casts do not move the deadline (unless the manager opts in via ``touch``);
* a timeout of ``None`` means never idle out.

Status moves only through the named transitions below (the runtime reads ``_status``
as a plain attribute on its hot paths and never writes it)::

    STARTING --activated--> RUNNING --begin_stop--> STOPPING --finished--> STOPPED
        |                      ^                        |
        +--start_failed--> STOPPED      RUNNING <--stop_failed

A stop request (``self.stop()`` of the agent) is kept here too: ``request_stop`` says
whether the stop can begin now or at the end of the current turn.

The runtime arms a timer for the deadline it reads back; a timer that fires early (the
deadline moved later since) finds ``is_due`` false and re-arms, so a stale timer is
harmless. Rarely used fields live in one lazily made :class:`Rare` record, so that a
plain idle incarnation carries none of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RUNNING", "STARTING", "STOPPED", "STOPPING", "Lifecycle", "Rare"]

# Status of an incarnation. Plain ints compared with `is` (small ints are cached).
STARTING = 0
RUNNING = 1
STOPPING = 2
STOPPED = 3

# What request_stop tells the runtime to do.
STOP_NOTHING = 0  # stopped or stopping already
STOP_LATER = 1  # remembered: acted on when the agent is running and its turn ends
STOP_NOW = 2  # running with a free turn: take the turn and stop


class Rare:
    """The fields an incarnation needs only sometimes (one object, made on first need)."""

    __slots__ = (
        "change",
        "codec_logged",
        "commit",
        "failures",
        "stop_reason",
        "stop_req",
        "subscribers",
        "timers",
        "unsure",
        "waiters",
        "writing",
    )

    def __init__(self) -> None:
        self.stop_req: Any = None  # StopReason asked for by the agent, not yet acted on
        self.stop_reason: Any = None  # why it stopped, once STOPPED
        self.failures = 0  # failed hibernates in a row
        self.codec_logged = False  # an unencodable state is logged once per incarnation
        self.unsure: set[int] | None = None  # seqs of failed writes that may have landed
        self.change: Any = None  # future resolved at the next change of status
        self.waiters: Any = None  # deque of queued turns
        self.writing: Any = None  # future of a live write in flight (checkpoint policies)
        self.commit: Any = None  # pending durable-turn state: see _commit.py
        self.subscribers: Any = None  # list of event subscribers
        self.timers: Any = None  # the agent's durable timers


class Lifecycle:
    """Status, owners, idle deadline and stop request of one agent incarnation."""

    __slots__ = ("_armed", "_deadline", "_owners", "_status", "_x")

    def __init__(self) -> None:
        self._status = STARTING
        self._owners: set[object] | None = None
        self._deadline: float | None = None
        self._armed: float | None = None  # the timer slot holding us; owned by the runtime
        self._x: Rare | None = None

    def _rare(self) -> Rare:
        x = self._x
        if x is None:
            x = self._x = Rare()
        return x

    # -- status -----------------------------------------------------------------------------

    def activated(self) -> None:
        """STARTING -> RUNNING: the state is in place and on_start ran."""
        assert self._status is STARTING, self._status
        self._status = RUNNING

    def start_failed(self, reason: Any) -> None:
        """STARTING -> STOPPED: the thaw or on_start failed (or was cancelled)."""
        self._status = STOPPED
        self._rare().stop_reason = reason

    def begin_stop(self) -> None:
        """RUNNING -> STOPPING: the runtime holds the turn and begins a hibernate or stop."""
        assert self._status is RUNNING, self._status
        self._status = STOPPING

    def stop_failed(self) -> None:
        """STOPPING -> RUNNING: the hibernate failed; the agent keeps running."""
        if self._status is STOPPING:
            self._status = RUNNING

    def finished(self, reason: Any) -> set[object] | tuple[()]:
        """-> STOPPED with ``reason``; forget owners, deadline and stop request.

        Returns the owners it had (the runtime unhooks them).
        """
        self._status = STOPPED
        x = self._rare()
        x.stop_reason = reason
        x.stop_req = None
        return self.clear()

    @property
    def stop_reason(self) -> Any:
        """``None`` while alive, else why this incarnation stopped."""
        x = self._x
        return None if x is None else x.stop_reason

    # -- the stop request -------------------------------------------------------------------

    def request_stop(self, reason: Any, busy: bool) -> int:
        """The agent asked to stop. Returns STOP_NOW, STOP_LATER or STOP_NOTHING.

        STARTING (from ``on_start``) or running with its turn held: remembered, and acted
        on when the agent runs and its turn ends (``take_stop_request``).
        """
        status = self._status
        if status is STARTING or (status is RUNNING and busy):
            self._rare().stop_req = reason
            return STOP_LATER
        if status is RUNNING:
            self._rare().stop_req = reason
            return STOP_NOW
        return STOP_NOTHING

    @property
    def stop_requested(self) -> Any:
        """The reason of a pending stop request, or ``None``."""
        x = self._x
        return None if x is None else x.stop_req

    def take_stop_request(self) -> Any:
        """Pop the pending stop request (its reason), or ``None``."""
        x = self._x
        if x is None or x.stop_req is None:
            return None
        reason, x.stop_req = x.stop_req, None
        return reason

    # -- owners and the deadline ------------------------------------------------------------

    @property
    def attachments(self) -> int:
        """How many owners are attached."""
        owners = self._owners
        return 0 if owners is None else len(owners)

    @property
    def idle_deadline(self) -> float | None:
        """Loop time at which the agent idles out, or ``None`` (attached, or no timeout)."""
        return self._deadline

    def started(self, now: float, timeout: float | None) -> bool:
        """A new incarnation: start the idle deadline. True when a timer must be armed."""
        if timeout is None:
            return False
        self._deadline = now + timeout
        return True

    def attached(self, owner: object) -> bool:
        """Add ``owner``; True when it was not attached before (idempotent per owner)."""
        owners = self._owners
        if owners is None:
            self._owners = {owner}
        elif owner in owners:
            return False
        else:
            owners.add(owner)
        self._deadline = None
        return True

    def detached(self, owner: object, now: float, timeout: float | None) -> bool:
        """Remove ``owner``; True when it was attached.

        When the last owner leaves, a fresh full deadline starts (``idle_deadline``).
        """
        owners = self._owners
        if owners is None or owner not in owners:
            return False
        owners.remove(owner)
        if not owners:
            self._owners = None
            if timeout is not None:
                self._deadline = now + timeout
        return True

    def touched(self, now: float, timeout: float | None) -> bool:
        """Restart the deadline when nothing is attached; True when a timer must be armed."""
        if self._owners is not None or timeout is None:
            return False
        self._deadline = now + timeout
        return True

    def postponed(self, deadline: float) -> None:
        """Set the deadline to ``deadline`` (a retry after a failed hibernate)."""
        self._deadline = deadline

    def is_due(self, now: float) -> bool:
        """Whether the agent has idled out at ``now``."""
        deadline = self._deadline
        return self._owners is None and deadline is not None and deadline <= now

    def clear(self) -> set[object] | tuple[()]:
        """Forget owners and deadline (the incarnation stopped); return the owners it had."""
        owners = self._owners
        self._owners = None
        self._deadline = None
        return () if owners is None else owners

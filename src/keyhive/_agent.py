"""The Agent base class: state, ``handle``, the lifecycle hooks, and what a turn may do."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from ._events import StopReason
from ._timers import schedule as _schedule  # a module-level name: an import per call costs ~1.8 µs
from ._timers import unschedule as _unschedule

if TYPE_CHECKING:
    from ._ref import AgentRef

__all__ = ["Agent"]


class Agent:
    """Subclass this and define ``async def handle(self, message)``.

    The manager creates one instance per incarnation. ``key``, ``partition``,
    ``manager`` and ``opts`` are set before any hook runs. Messages are handled one at
    a time, in arrival order; ``handle`` runs in the task of the caller that sent the
    message (a ``call``) or in a task of the manager's (a ``cast``, or a call whose
    handler suspended: the turn runs to completion even when its caller stops waiting).
    """

    # state and the ref in slots, a __dict__ only for what a subclass adds: a plain agent
    # costs 64 bytes, not a dict of its own
    __slots__ = ("__dict__", "_ref", "state")

    state_type: ClassVar[type[Any] | None] = None
    """When set, fresh states are ``state_type(**params)`` and thawed ones decode into it."""

    state_version: ClassVar[int] = 1
    """Version written with every checkpoint; older checkpoints go through ``migrate``."""

    allow_dropped_fields: ClassVar[bool] = False
    """When True, a thawed state may have stored fields that ``state_type`` drops.

    By default such a thaw is refused (``ThawError``): a field renamed without a
    ``state_version`` bump would otherwise thaw as its default, losing the stored value.
    """

    if TYPE_CHECKING:
        state: Any
        _ref: AgentRef

    @property
    def key(self) -> Any:
        """The key this agent serves."""
        return self._ref._key

    @property
    def partition(self) -> Any:
        """The partition of the key (``None`` when none)."""
        return self._ref._partition

    @property
    def manager(self) -> str:
        """The name of the manager running this agent."""
        return self._ref._host.name

    @property
    def opts(self) -> Mapping[str, Any]:
        """The manager's ``agent_opts`` (read-only)."""
        return self._ref._host.agent_opts

    def initial_state(self, params: dict[str, Any]) -> Any:
        """The state of a fresh agent, from ``get(..., initial_state=params)``."""
        if self.state_type is not None:
            return self.state_type(**params)
        return dict(params)

    async def handle(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to ``call``."""
        raise NotImplementedError(f"{type(self).__name__} must define async def handle(self, message)")

    def migrate(self, data: Any, from_version: int) -> Any:
        """Turn the decoded data of a checkpoint written by ``from_version`` into current data.

        The default refuses: a class that raises ``state_version`` must say how.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.state_version is {self.state_version} but the checkpoint "
            f"was written by version {from_version}: define migrate(self, data, from_version)"
        )

    async def on_start(self, thawed: bool) -> None:
        """Called once the state is in place; ``thawed`` when it came from a checkpoint."""

    async def on_hibernate(self) -> None:
        """Called before the checkpoint is written (storage on)."""

    async def on_stop(self, reason: StopReason) -> None:
        """Called after the checkpoint is written, as the incarnation stops."""

    def stop(self, reason: StopReason | str = StopReason.NORMAL) -> None:
        """Stop this agent after the current message: hibernate (storage on), then stop."""
        self._ref._request_stop(StopReason(reason))

    def publish(self, event: Any) -> None:
        """Deliver ``event`` to every subscriber of this incarnation, in publish order.

        A plain call inside a turn: it never waits. A subscriber that fell more than
        ``subscriber_buffer`` events behind is dropped (its iteration raises
        ``SubscriberOverflow``).
        """
        from ._pubsub import publish

        publish(self._ref, event)

    def schedule(self, name: str, when: float | timedelta | datetime, message: Any, *,
                 every: float | timedelta | None = None) -> None:
        """Cast ``message`` to this agent at ``when``, durably (SPEC §12); a plain call in a turn.

        ``when`` is seconds from now (int, float, timedelta) or a timezone-aware
        ``datetime``; ``every`` makes it periodic (seconds > 0), at ``when + n * every``.
        Scheduling ``name`` again replaces that timer. The timer is written with the
        agent's next checkpoint and survives hibernation and restarts; a handler that
        raises is retried with backoff. The message arrives as the codec decodes it.

        Raises:
            TypeError, ValueError: a bad name, time or period (a naive datetime, say).
            CodecError: the message cannot be encoded by the manager's codec.
        """
        _schedule(self._ref, name, when, message, every)

    def unschedule(self, name: str) -> bool:
        """Cancel the timer ``name``; ``True`` when there was one. A plain call in a turn."""
        return _unschedule(self._ref, name)

    async def checkpoint(self) -> None:
        """Write the state to storage now, whatever the ``checkpoint`` policy.

        Nothing is written when the state is what was last written.

        Raises:
            StorageError, ConflictError: the write failed; the state stays in memory.
            CodecError: the state cannot be encoded.
        """
        from ._commit import checkpoint_now

        ref = self._ref
        await checkpoint_now(ref._host, ref)  # type: ignore[arg-type]

"""The exception tree.

Every error keyhive raises on purpose derives from :class:`KeyhiveError`::

    KeyhiveError
    ├── NotFound            (also a LookupError)  no such agent / manager
    ├── AgentStopped        the incarnation behind an AgentRef has stopped
    ├── ManagerClosed       the manager is not running (before start, after close)
    ├── ThawError           a checkpoint exists but cannot be restored; nothing was started
    ├── CodecError          a state (message, reply) cannot be encoded, or bytes decoded
    ├── OwnedElsewhere      another live process holds this manager's lease
    ├── ReentrancyError     a call would wait for a turn held further up its own call chain
    ├── SubscriberOverflow  a subscriber fell more than ``subscriber_buffer`` events behind
    └── StorageError        a storage backend failed; the original error is ``__cause__``
        ├── ConflictError   a compare-and-set write lost: newer state is already stored
        │   └── LeaseLost   the writer's lease was taken over: nothing was written
        └── UnsavedAgentsError  close could not save every live agent before its deadline

Configuration mistakes are ``TypeError`` / ``ValueError``; timeouts are the builtin
``TimeoutError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AgentStopped",
    "CodecError",
    "ConflictError",
    "KeyhiveError",
    "LeaseLost",
    "ManagerClosed",
    "NotFound",
    "OwnedElsewhere",
    "ReentrancyError",
    "StorageError",
    "SubscriberOverflow",
    "ThawError",
    "UnsavedAgentsError",
]


class KeyhiveError(Exception):
    """Base class of every error keyhive raises on purpose."""


class NotFound(KeyhiveError, LookupError):
    """No live agent for that key, or no running manager of that name."""


class AgentStopped(KeyhiveError):
    """The agent incarnation behind this reference has stopped."""


class ManagerClosed(KeyhiveError):
    """The manager is not running: it was not started yet, or it was closed."""


class ThawError(KeyhiveError):
    """A checkpoint exists but could not be restored.

    Nothing was started and the stored bytes were left untouched; the underlying
    error is ``__cause__``.
    """


class CodecError(KeyhiveError):
    """A state could not be encoded, or stored bytes could not be decoded."""


class StorageError(KeyhiveError):
    """A storage backend failed; the backend's own exception is ``__cause__``."""


class ConflictError(StorageError):
    """A compare-and-set write found a different version stored: nothing was written."""


class LeaseLost(ConflictError):
    """The writer's lease was taken over by another holder (a higher epoch): nothing was written.

    The manager that gets it stops the agents of that lease with ``StopReason.LEASE_LOST``.
    """


class OwnedElsewhere(KeyhiveError):
    """Another live process holds the lease of this manager's namespace (or shard).

    ``holder`` names it (host, pid, instance) and ``since`` is when it took the lease
    (seconds since the epoch, by the storage's clock), when known.
    """

    def __init__(self, message: str, *, holder: str | None = None, since: float | None = None) -> None:
        super().__init__(message)
        self.holder = holder
        self.since = since


class ReentrancyError(KeyhiveError):
    """A call inside a turn would wait for a turn held further up its own call chain.

    ``chain`` lists the keys, outermost first, ending with the key called again.
    """

    def __init__(self, message: str, chain: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.chain = list(chain)


class SubscriberOverflow(KeyhiveError):
    """A subscriber fell more than ``subscriber_buffer`` events behind and was dropped."""


class UnsavedAgentsError(StorageError):
    """Manager close could not save every live agent before its deadline.

    ``keys`` lists ``(partition, key)`` of the agents whose state was not saved and
    ``errors`` the last error seen for each.
    """

    def __init__(self, message: str, keys: Sequence[tuple[Any, Any]],
                 errors: Sequence[BaseException | None]) -> None:
        super().__init__(message)
        self.keys = list(keys)
        self.errors = list(errors)

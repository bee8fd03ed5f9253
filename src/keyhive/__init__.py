"""keyhive: one live asyncio agent per key.

Started on demand, kept alive while someone is attached, hibernated to storage when
idle, thawed on the next ``get``. Start with :class:`InstanceManager` and
:class:`Agent`.
"""

from __future__ import annotations

from ._agent import Agent
from ._errors import (
    AgentStopped,
    CodecError,
    ConflictError,
    KeyhiveError,
    LeaseLost,
    ManagerClosed,
    NotFound,
    OwnedElsewhere,
    ReentrancyError,
    StorageError,
    SubscriberOverflow,
    ThawError,
    UnsavedAgentsError,
)
from ._events import Event, EventKind, StopReason
from ._manager import InstanceManager, Stats, get_manager
from ._ref import AgentRef
from .codecs import Codec, JSONCodec
from .storage import Checkpoint, FileStorage, MemoryStorage, SaveItem, Storage, StoredKey

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentRef",
    "AgentStopped",
    "Checkpoint",
    "Codec",
    "CodecError",
    "ConflictError",
    "Event",
    "EventKind",
    "FileStorage",
    "get_manager",
    "InstanceManager",
    "JSONCodec",
    "KeyhiveError",
    "LeaseLost",
    "ManagerClosed",
    "MemoryStorage",
    "NotFound",
    "OwnedElsewhere",
    "ReentrancyError",
    "SaveItem",
    "Stats",
    "StopReason",
    "Storage",
    "StorageError",
    "StoredKey",
    "SubscriberOverflow",
    "ThawError",
    "UnsavedAgentsError",
]

# Show the public names in reprs and tracebacks, not the private modules.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("keyhive."):
        _obj.__module__ = "keyhive"
del _name, _obj

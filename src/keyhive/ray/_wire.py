"""What crosses between clients and shard hosts besides codec bytes: errors.

An exception raised on a shard host travels as ``(type name, message, pickled exception
or None, remote traceback text)``. The client rebuilds the same exception when its class
can be unpickled there (keyhive's errors always can, with their attributes), and a
:class:`RemoteError` naming the original type otherwise. Ray itself pickles every
argument between these processes: both ends are the same trusted cluster.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from .._errors import KeyhiveError

__all__ = ["RemoteError", "dump_error", "load_error"]

ErrorPayload = tuple[str, str, bytes | None, str]


class RemoteError(KeyhiveError):
    """An exception raised on a shard host whose type cannot be rebuilt in this process.

    ``type_name`` is the original's qualified type name; the message is its ``str()``.
    """

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.type_name))


def dump_error(exc: BaseException) -> ErrorPayload:
    """The wire form of ``exc`` (on the shard host)."""
    kind = type(exc)
    name = f"{kind.__module__}.{kind.__qualname__}"
    tb = "".join(traceback.format_exception(exc)[-6:])
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # a class whose pickle does not round-trip here cannot anywhere
    except Exception:
        return name, str(exc), None, tb
    return name, str(exc), blob, tb


def load_error(payload: ErrorPayload, where: str) -> BaseException:
    """The exception to raise in the caller (on the client)."""
    name, message, data, tb = payload
    exc: BaseException | None = None
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(f"{name}: {message}", name)
    exc.add_note(f"raised in {where}:\n{tb.rstrip()}")
    return exc

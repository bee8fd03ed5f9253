"""What crosses between clients and shard hosts besides codec bytes: errors.

An exception raised on a shard host travels as plain data: its class's module and
qualified name, its message, its ``args`` and its instance attributes (the plain ones:
str, int, float, bool, None and lists, tuples and dicts of those; anything else as its
``repr``), and the host's traceback text. The client rebuilds the same class when that
class is already loaded in the client (keyhive's errors, builtins, the agent's own
module) without calling its ``__init__``, and raises :class:`RemoteError` naming the
original type otherwise. Nothing is unpickled and nothing is imported on the remote
side's say-so.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from .._errors import KeyhiveError

__all__ = ["RemoteError", "dump_error", "load_error"]

ErrorPayload = tuple[str, str, str, tuple[Any, ...], dict[str, Any], str]
_MAX_DEPTH = 8


class RemoteError(KeyhiveError):
    """An exception raised on a shard host whose type cannot be rebuilt in this process.

    ``type_name`` is the original's qualified type name; the message names it too.
    """

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or type(value) in (str, int, float, bool):
        return True
    if depth >= _MAX_DEPTH:
        return False
    if type(value) in (list, tuple):
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain(v, depth + 1) for k, v in value.items())
    return False


def dump_error(exc: BaseException) -> ErrorPayload:
    """The wire form of ``exc`` (on the shard host)."""
    kind = type(exc)
    args = tuple(a if _plain(a) else repr(a) for a in exc.args)
    attrs = {k: v for k, v in getattr(exc, "__dict__", {}).items() if _plain(v)}
    tb = "".join(traceback.format_exception(exc)[-6:])
    return kind.__module__, kind.__qualname__, str(exc), args, attrs, tb


def _rebuild(module: str, qualname: str, args: tuple[Any, ...],
             attrs: dict[str, Any]) -> BaseException | None:
    if "<" in qualname:  # defined inside a function: no name reaches it here
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        return None
    try:
        exc = found.__new__(found, *args)
        exc.args = args
        exc.__dict__.update(attrs)
    except Exception:  # noqa: BLE001  # a type that cannot be rebuilt arrives as RemoteError
        return None
    return exc


def load_error(payload: ErrorPayload, where: str) -> BaseException:
    """The exception to raise in the caller (on the client)."""
    module, qualname, message, args, attrs, tb = payload
    exc = _rebuild(module, qualname, tuple(args), dict(attrs))
    if exc is None:
        name = qualname if module == "builtins" else f"{module}.{qualname}"
        exc = RemoteError(f"{name}: {message}", name)
    exc.add_note(f"raised in {where}:\n{tb.rstrip()}")
    return exc

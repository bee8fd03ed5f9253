"""State codecs and the checkpoint envelope.

A codec turns an agent's state into bytes and back. The default :class:`JSONCodec`
takes JSON-compatible values plus dataclasses, msgspec Structs, pydantic models,
``datetime`` and ``UUID``; with a ``state_type`` it decodes into that type. It encodes
with orjson, which refuses what JSON cannot carry faithfully (sets, non-str dict keys,
cycles) instead of turning it into something else, and decodes typed states with
msgspec. Nothing is ever unpickled.

Every checkpoint is wrapped in an envelope so that a torn or corrupt write is detected
on thaw instead of being restored as wrong state::

    keyhive/1 <state_version> <crc32 of payload, 8 hex> <payload length>\\n<payload>
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
import zlib
from typing import Any, Protocol, runtime_checkable

import msgspec
import orjson

from ._errors import CodecError

__all__ = ["Codec", "JSONCodec", "pack", "unpack"]


@runtime_checkable
class Codec(Protocol):
    """Encodes states to bytes and decodes them back, optionally into ``state_type``."""

    def encode(self, state: Any) -> bytes:
        """Bytes for ``state``; raise :class:`~keyhive.CodecError` when it cannot be encoded."""
        ...

    def decode(self, data: bytes, state_type: type[Any] | None = None) -> Any:
        """The state encoded in ``data`` (as ``state_type`` when given)."""
        ...


def _is_pydantic(tp: type[Any]) -> bool:
    return hasattr(tp, "model_validate") and hasattr(tp, "model_dump")


def _default(obj: Any) -> Any:
    if isinstance(obj, msgspec.Struct):
        return msgspec.structs.asdict(obj)
    if hasattr(obj, "model_dump") and hasattr(type(obj), "model_validate"):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _strict_default(obj: Any) -> Any:
    if isinstance(obj, datetime.datetime | datetime.date | datetime.time | uuid.UUID):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return _default(obj)


class JSONCodec:
    """Compact JSON: fast, and readable in any storage tool."""

    __slots__ = ()

    def encode(self, state: Any) -> bytes:
        try:
            data = orjson.dumps(state, default=_default)
        except (TypeError, ValueError, RecursionError) as exc:  # orjson.JSONEncodeError is a TypeError
            raise CodecError(f"state is not JSON-encodable: {exc}") from exc
        if b"null" in data:
            # orjson writes NaN and infinities as null, which would thaw as other state.
            # Only a state with a null in it can hide one: check those strictly.
            try:
                json.dumps(state, allow_nan=False, default=_strict_default)
            except ValueError as exc:
                raise CodecError(f"state is not JSON-encodable: {exc} (NaN or infinity)") from exc
        return data

    def decode(self, data: bytes, state_type: type[Any] | None = None) -> Any:
        try:
            if state_type is None:
                return orjson.loads(data)
            if _is_pydantic(state_type):
                return state_type.model_validate_json(data)
            return msgspec.json.decode(data, type=state_type)
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"cannot decode state: {exc}") from exc


_MAGIC = b"keyhive/1 "


def pack(state_version: int, payload: bytes) -> bytes:
    """Wrap an encoded state in the checkpoint envelope."""
    # one bytes formatting: the same envelope as "<magic><version> <crc:08x> <length>\n<payload>"
    return b"keyhive/1 %d %08x %d\n%b" % (state_version, zlib.crc32(payload), len(payload), payload)


def unpack(data: bytes) -> tuple[int, bytes]:
    """``(state_version, payload)`` from a checkpoint, verifying length and checksum.

    Raises:
        CodecError: not a keyhive checkpoint, truncated, or corrupt.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"checkpoint must be bytes, not {type(data).__name__}")
        data = bytes(data)
    if not data.startswith(_MAGIC):
        raise CodecError("not a keyhive checkpoint (bad header)")
    start = len(_MAGIC)
    end = data.find(b"\n", start, start + 64)
    if end < 0:
        raise CodecError("truncated checkpoint header")
    try:
        # int() reads ASCII digits from bytes directly, and refuses anything else
        version_s, crc_s, length_s = data[start:end].split(b" ")
        state_version, crc, length = int(version_s), int(crc_s, 16), int(length_s)
    except ValueError as exc:
        raise CodecError("corrupt checkpoint header") from exc
    payload = data[end + 1:]
    if len(payload) != length:
        raise CodecError(f"truncated checkpoint: {len(payload)} of {length} payload bytes")
    if zlib.crc32(payload) != crc:
        raise CodecError("corrupt checkpoint: checksum mismatch")
    return state_version, payload

"""State codecs and the checkpoint envelope.

A codec turns an agent's state into bytes and back. The default :class:`JSONCodec`
takes JSON-compatible values plus dataclasses, msgspec Structs, pydantic models,
``datetime`` and ``UUID``; with a ``state_type`` it decodes into that type. It encodes
with orjson, which refuses what JSON cannot carry faithfully (sets, non-str dict keys,
cycles) instead of turning it into something else, and decodes typed states with
msgspec. Nothing is ever unpickled. Decoding into a ``state_type`` refuses stored fields
that the type would drop (a renamed field without a ``state_version`` bump), unless
``allow_dropped_fields`` is set.

Every checkpoint is wrapped in an envelope so that a torn or corrupt write is detected
on thaw instead of being restored as wrong state::

    keyhive/2 <state_version> <writer> <seq> <meta length> <payload length>\\n<meta><payload><crc32>

The CRC32 (8 lowercase hex digits, compared as bytes) covers every byte before it: the
whole header and everything after it, so any single-bit flip anywhere is refused, and a
state_version damaged in the header never sends migrated data through ``migrate`` again.
``writer`` (up to 64 of ``A-Z a-z 0-9 _ . : -``, possibly empty) and ``seq`` name the
write: the manager instance that wrote it and that writer's sequence number, so an
incarnation can recognise its own earlier write after a lost reply by identity
(:func:`peek_writer`). ``meta`` is optional bytes (e.g. the agent's durable timers).
Version-1 checkpoints (``keyhive/1 <state_version> <crc32 of payload> <payload length>\\n<payload>``) still
unpack, with no writer, ``seq`` 0 and no meta.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import re
import typing
import uuid
import zlib
from typing import Any, NamedTuple, Protocol, runtime_checkable

import msgspec
import orjson

from ._errors import CodecError

__all__ = ["Codec", "Envelope", "JSONCodec", "decode_state", "pack", "peek_writer", "unpack"]


@runtime_checkable
class Codec(Protocol):
    """Encodes states to bytes and decodes them back, optionally into ``state_type``.

    ``decode`` may also take a keyword ``allow_dropped_fields`` (as :class:`JSONCodec`
    does); :func:`decode_state` passes it only to codecs that accept it.
    """

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

    def decode(
        self, data: bytes, state_type: type[Any] | None = None, *, allow_dropped_fields: bool = False
    ) -> Any:
        """The state in ``data``; with ``state_type``, decoded into that type.

        Raises:
            CodecError: ``data`` is not JSON, does not fit ``state_type``, or has fields
                that ``state_type`` would drop (unless ``allow_dropped_fields``).
        """
        try:
            if state_type is None:
                return orjson.loads(data)
            if _is_pydantic(state_type):
                value = state_type.model_validate_json(data)
            else:
                value = msgspec.json.decode(data, type=state_type)
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"cannot decode state: {exc}") from exc
        if not allow_dropped_fields:
            _refuse_dropped_fields(data, state_type, value)
        return value


# -- schema drift: stored fields that a state_type would drop --------------------------------------

_raw_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_raw_array = msgspec.json.Decoder(list[msgspec.Raw]).decode
_NOT_THAT_SHAPE = (msgspec.DecodeError, msgspec.ValidationError)
_MAX_DEPTH = 64


class _Shape(NamedTuple):
    """What decoding into one class keeps of a stored JSON object."""

    names: frozenset[str]  # stored keys the class reads (field names, aliases, computed fields)
    nested: tuple[tuple[str, str], ...]  # (stored key, attribute) of fields that may hold classes
    items: bool  # a TypedDict: the decoded value is a dict, read fields as items


_shapes: dict[Any, _Shape | None] = {}


def _is_structured(tp: Any) -> bool:
    return isinstance(tp, type) and (
        _is_pydantic(tp) or issubclass(tp, msgspec.Struct)
        or dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)
    )


def _may_nest(annotation: Any, depth: int = 0) -> bool:
    """Whether a field of this annotation may hold a class whose fields could be dropped."""
    if isinstance(annotation, str | typing.ForwardRef) or depth > 16:
        return True  # unresolved: look at the value when decoding
    if _is_structured(annotation):
        return True
    return any(_may_nest(arg, depth + 1) for arg in typing.get_args(annotation))


def _hints(tp: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(tp)
    except Exception:  # noqa: BLE001  # an unresolvable annotation: every field is looked at when decoding
        return {}


def _build_shape(tp: Any) -> _Shape | None:  # tp: Any, as the model_* and __*_keys__ reads are duck-typed
    if not isinstance(tp, type):
        return None
    tp = typing.cast(Any, tp)
    names: set[str] = set()
    nested: list[tuple[str, str]] = []
    if _is_pydantic(tp):
        if tp.model_config.get("extra") in ("allow", "forbid"):
            return None  # "allow" keeps unknown fields, "forbid" refuses them itself
        for name, info in tp.model_fields.items():
            stored = {name}
            for alias in (info.alias, info.validation_alias):
                if isinstance(alias, str):
                    stored.add(alias)
                for choice in getattr(alias, "choices", ()):  # AliasChoices
                    if isinstance(choice, str):
                        stored.add(choice)
            names |= stored
            if _may_nest(info.annotation):
                nested.extend((key, name) for key in stored)
        names.update(tp.model_computed_fields)  # written by model_dump, recomputed on decode
        return _Shape(frozenset(names), tuple(nested), False)
    if issubclass(tp, msgspec.Struct):
        config = tp.__struct_config__
        if config.forbid_unknown_fields or config.array_like:
            return None
        if isinstance(config.tag_field, str):
            names.add(config.tag_field)
        hints = _hints(tp)
        for field in msgspec.structs.fields(tp):
            names.update((field.name, field.encode_name))
            if _may_nest(hints.get(field.name, "?")):
                nested.extend({(field.name, field.name), (field.encode_name, field.name)})
        return _Shape(frozenset(names), tuple(nested), False)
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        for dc_field in dataclasses.fields(tp):
            names.add(dc_field.name)
            if _may_nest(hints.get(dc_field.name, "?")):
                nested.append((dc_field.name, dc_field.name))
        return _Shape(frozenset(names), tuple(nested), False)
    if typing.is_typeddict(tp):
        hints = _hints(tp)
        for name in tp.__required_keys__ | tp.__optional_keys__:
            names.add(name)
            if _may_nest(hints.get(name, "?")):
                nested.append((name, name))
        return _Shape(frozenset(names), tuple(nested), True)
    return None


def _shape(tp: Any) -> _Shape | None:
    try:
        return _shapes[tp]
    except KeyError:
        shape = _shapes[tp] = _build_shape(tp)
        return shape
    except TypeError:  # an unhashable type form: nothing to look up
        return None


def _field_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_object(raw: bytes, value: Any, shape: _Shape, path: str, out: list[str], depth: int) -> None:
    try:
        stored = _raw_object(raw)
    except _NOT_THAT_SHAPE:
        return  # not a JSON object: the decoder read it some other way, nothing to compare
    names = shape.names
    if not stored.keys() <= names:  # a set comparison in C: the usual case costs no Python loop
        out.extend(_field_path(path, key) for key in stored if key not in names)
    for key, attr in shape.nested:
        child_raw = stored.get(key)
        if child_raw is not None:
            child = value.get(attr) if shape.items else getattr(value, attr, None)
            _walk(child_raw, child, _field_path(path, key), out, depth + 1)


def _walk(raw: bytes, value: Any, path: str, out: list[str], depth: int) -> None:
    """Append the paths of stored fields that decoding ``raw`` into ``value`` dropped."""
    if depth > _MAX_DEPTH:
        return
    kind = type(value)
    if kind is list or kind is tuple:
        if value:
            try:
                items = _raw_array(raw)
            except _NOT_THAT_SHAPE:
                return
            for i, (item_raw, item) in enumerate(zip(items, value, strict=False)):
                _walk(item_raw, item, f"{path}[{i}]", out, depth + 1)
    elif kind is dict:
        if value:
            try:
                stored = _raw_object(raw)
            except _NOT_THAT_SHAPE:
                return
            for key, item_raw in stored.items():
                if key in value:
                    _walk(item_raw, value[key], f"{path}[{key!r}]", out, depth + 1)
    else:
        shape = _shape(kind)
        if shape is not None:
            _check_object(raw, value, shape, path, out, depth)


def _refuse_dropped_fields(data: bytes, state_type: Any, value: Any) -> None:
    out: list[str] = []
    shape = _shape(state_type)
    if shape is not None:
        _check_object(data, value, shape, "", out, 0)
    else:  # a generic type such as list[Model]: look at what was decoded
        _walk(data, value, "", out, 0)
    if out:
        fields = ", ".join(repr(name) for name in dict.fromkeys(out))
        name = getattr(state_type, "__name__", repr(state_type))
        raise CodecError(
            f"the stored state has field(s) {fields} that {name} does not have: decoding would drop "
            f"them. Bump state_version and define migrate(), or set `allow_dropped_fields = True` "
            f"on the agent class"
        )


_takes_flag: dict[Any, bool] = {}


def _accepts_flag(decode: Any) -> bool:
    try:
        params = inspect.signature(decode).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it the two-argument way
        return False
    return any(p.name == "allow_dropped_fields" or p.kind is p.VAR_KEYWORD for p in params)


def decode_state(codec: Codec, data: bytes, state_type: type[Any] | None, allow_dropped_fields: bool) -> Any:
    """``codec.decode(data, state_type)``, with ``allow_dropped_fields`` when ``decode`` takes it.

    User codecs with the two-argument ``decode`` keep working (and do their own checks).
    """
    if type(codec) is JSONCodec:
        return codec.decode(data, state_type, allow_dropped_fields=allow_dropped_fields)
    decode = codec.decode
    func = getattr(decode, "__func__", decode)  # one entry per function, not per bound method
    try:
        takes = _takes_flag[func]
    except (KeyError, TypeError):
        takes = _accepts_flag(decode)
        with contextlib.suppress(TypeError):  # an unhashable callable: ask again next time
            _takes_flag[func] = takes
    if takes:
        return decode(data, state_type, allow_dropped_fields=allow_dropped_fields)  # type: ignore[call-arg]
    return decode(data, state_type)


# -- the checkpoint envelope ---------------------------------------------------------------------

class Envelope(NamedTuple):
    """A checkpoint's contents, from :func:`unpack`."""

    state_version: int
    payload: bytes
    writer: str
    """The writing manager instance ("" for version-1 checkpoints and anonymous writers)."""
    seq: int
    """That writer's write sequence number (0 when none)."""
    meta: bytes
    """Optional bytes written beside the state (b"" when none)."""


_MAGIC1 = b"keyhive/1 "
_MAGIC2 = b"keyhive/2 "
_HEADER_MAX = 256  # bytes up to and including the newline; pack never writes a longer header
_MAX_WRITER = 64
_BIG = 10**20
_WRITER_RE = re.compile(rb"[A-Za-z0-9_.:\-]{0,%d}" % _MAX_WRITER)
_crc32 = zlib.crc32
_new_envelope = tuple.__new__  # skips the NamedTuple's Python-level __new__ (~90 ns per unpack)
# Writers seen: each manager uses one, so the check and the ASCII encoding happen once.
_writer_bytes: dict[str, bytes] = {"": b""}
_writer_strs: dict[bytes, str] = {b"": ""}


def _remember(table: dict[Any, Any], key: Any, value: Any) -> None:
    if len(table) > 1024:  # many writers (a long-lived reader of others' checkpoints): start over
        table.clear()
    table[key] = value


def _writer_to_bytes(writer: object) -> bytes:
    if type(writer) is not str:
        raise CodecError(f"writer must be a str, not {type(writer).__name__}")
    raw = writer.encode("ascii", "replace")
    if not writer.isascii() or _WRITER_RE.fullmatch(raw) is None:
        raise CodecError(
            f"writer {writer!r} is not a token: write up to {_MAX_WRITER} ASCII letters, digits "
            f"and _.:- (e.g. 16 hex characters)"
        )
    _remember(_writer_bytes, writer, raw)
    return raw


def _writer_from_bytes(raw: bytes) -> str:
    if _WRITER_RE.fullmatch(raw) is None:
        what = "non-ASCII" if not raw.isascii() else "bad"
        raise CodecError(f"corrupt checkpoint header: {what} writer {raw[:80]!r}")
    writer = raw.decode("ascii")
    _remember(_writer_strs, raw, writer)
    return writer


def pack(state_version: int, payload: bytes, *, writer: str = "", seq: int = 0, meta: bytes = b"") -> bytes:
    """Wrap an encoded state in the checkpoint envelope, with the writer's identity and ``meta``.

    Raises:
        CodecError: ``state_version`` or ``seq`` is not an int (``seq`` < 0), or ``writer`` is not
            a short ASCII token.
    """
    wb = _writer_bytes.get(writer)  # a non-str writer is refused by _writer_to_bytes
    if wb is None:
        wb = _writer_to_bytes(writer)
    # the bounds keep the header within _HEADER_MAX bytes (64 + 4 * 21 + 10 < 256)
    if not (type(state_version) is int and type(seq) is int
            and 0 <= seq < _BIG and -_BIG < state_version < _BIG):
        raise CodecError(
            f"state_version must be an int and seq an int >= 0 (both under 10**20), "
            f"not {state_version!r} and {seq!r}"
        )
    # one formatting and one CRC over all of it: a CRC'd header formatted apart costs ~120 ns more
    body = b"keyhive/2 %d %b %d %d %d\n%b%b" % (
        state_version, wb, seq, len(meta), len(payload), meta, payload)
    return b"%b%08x" % (body, _crc32(body))


def _header(data: bytes) -> tuple[int, bytes, bytes, bytes, int]:
    """``(end, version, writer, seq, meta length)`` of a version-2 checkpoint's header.

    ``end`` is the index of the newline. Checks the form and the lengths, not the CRC.
    """
    end = data.find(b"\n", 10, _HEADER_MAX)
    if end < 0:
        if len(data) < _HEADER_MAX:
            raise CodecError("truncated checkpoint header")
        raise CodecError(f"corrupt checkpoint header: no end within {_HEADER_MAX} bytes")
    try:
        version_s, writer_b, seq_s, mlen_s, plen_s = data[10:end].split(b" ")
    except ValueError:
        raise CodecError("corrupt checkpoint header") from None
    # bytes.isdigit() is ASCII-only: no sign, space or underscore that int() would take
    if not (mlen_s.isdigit() and plen_s.isdigit() and seq_s.isdigit()):
        raise CodecError("corrupt checkpoint header")
    mlen = int(mlen_s)
    want = mlen + int(plen_s) + 8
    have = len(data) - end - 1
    if have != want:
        if have < want:
            raise CodecError(f"truncated checkpoint: {have} of {want} bytes after the header")
        raise CodecError(f"corrupt checkpoint: {have} bytes after the header, not {want}")
    return end, version_s, writer_b, seq_s, mlen


def unpack(data: bytes) -> Envelope:
    """The :class:`Envelope` of a checkpoint (version 2 or 1), verifying lengths and checksum.

    Raises:
        CodecError: not a keyhive checkpoint, truncated, or corrupt.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"checkpoint must be bytes, not {type(data).__name__}")
        data = bytes(data)
    if not data.startswith(_MAGIC2):
        if data.startswith(_MAGIC1):
            return _new_envelope(Envelope, (*_unpack_v1(data), "", 0, b""))
        raise CodecError("not a keyhive checkpoint (bad header)")
    # _header(), inlined: ~60 ns
    end = data.find(b"\n", 10, _HEADER_MAX)
    try:
        version_s, writer_b, seq_s, mlen_s, plen_s = data[10:end].split(b" ")
    except ValueError:
        _header(data)  # says what is wrong
        raise
    if not (mlen_s.isdigit() and plen_s.isdigit() and seq_s.isdigit()) or end < 0:
        _header(data)
    mlen = int(mlen_s)
    if len(data) - end - 9 != mlen + int(plen_s):
        _header(data)
    # exact bytes: int(.., 16) would take "ABCDEF" for "abcdef"
    if b"%08x" % _crc32(data[:-8] if len(data) < 4096 else memoryview(data)[:-8]) != data[-8:]:
        raise CodecError("corrupt checkpoint: checksum mismatch")
    if mlen:
        meta = data[end + 1:end + 1 + mlen]
        payload = data[end + 1 + mlen:-8]
    else:
        meta = b""
        payload = data[end + 1:-8]
    writer = _writer_strs.get(writer_b)
    if writer is None:
        writer = _writer_from_bytes(writer_b)
    try:
        version, seq = int(version_s), int(seq_s)
    except ValueError:
        raise CodecError("corrupt checkpoint header") from None
    return _new_envelope(Envelope, (version, payload, writer, seq, meta))


def peek_writer(data: bytes) -> tuple[str, int] | None:
    """``(writer, seq)`` of a checkpoint, or ``None`` when it names no writer (version 1, or "").

    Parses only the header and copies nothing of the body, but verifies the checksum over
    all of it: an identity is read only from an intact checkpoint.

    Raises:
        CodecError: not a keyhive checkpoint, truncated, or corrupt.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"checkpoint must be bytes, not {type(data).__name__}")
        data = bytes(data)
    if data.startswith(_MAGIC1):
        _unpack_v1(data)
        return None
    if not data.startswith(_MAGIC2):
        raise CodecError("not a keyhive checkpoint (bad header)")
    _, version_s, writer_b, seq_s, _ = _header(data)
    if b"%08x" % _crc32(memoryview(data)[:-8]) != data[-8:]:
        raise CodecError("corrupt checkpoint: checksum mismatch")
    writer = _writer_from_bytes(writer_b)
    try:
        int(version_s)
        seq = int(seq_s)
    except ValueError:
        raise CodecError("corrupt checkpoint header") from None
    return (writer, seq) if writer else None


def _unpack_v1(data: bytes) -> tuple[int, bytes]:
    """``(state_version, payload)`` of a version-1 checkpoint (CRC over the payload only)."""
    start = len(_MAGIC1)
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
    if _crc32(payload) != crc:
        raise CodecError("corrupt checkpoint: checksum mismatch")
    return state_version, payload

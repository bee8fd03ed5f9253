"""Key validation and the encoding of ``(manager, partition, key)`` into storage keys.

A storage key is canonical compact JSON: ``["<manager>",<partition>,<key>]`` where
``str`` and ``int`` stay as they are, ``bytes`` become ``{"b":"<base64>"}``, a UUID
``{"u":"<uuid>"}``, a tuple a JSON array, and no partition ``null``. The encoding is
injective (``1``, ``"1"`` and ``(1,)`` are three keys) and readable in any backend's
own tools. ``storage_prefix`` gives the prefix that lists one manager or partition.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

__all__ = [
    "MAX_KEY_BYTES",
    "check_key",
    "is_plain_key",
    "decode_storage_key",
    "storage_key",
    "storage_prefix",
    "untag",
]

MAX_KEY_BYTES = 1024
MAX_KEY_DEPTH = 16
# A str of this many characters encodes to at most 6 * 170 + 2 = 1022 JSON bytes
# (a control character becomes a 6-byte \u escape; anything else takes at most 4).
# Fast paths take only ASCII strs of this length (is_plain_key): other strs go through
# check_key, which also refuses lone surrogates (not valid UTF-8).
SAFE_STR_LEN = (MAX_KEY_BYTES - 2) // 6

# An int below 2**3398 (about 10**1022.9) has at most 1023 digits: with a sign, 1024 bytes.
# Longer ones are measured (_check_int) without converting a huge int to str first.
_INT_SAFE_BITS = 3398
_LOG10_2 = 0.30102999566398120

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_json_str = json.encoder.encode_basestring  # how _dumps writes a str (ensure_ascii=False)


def _tagged(key: object, depth: int, what: str) -> Any:
    kind = type(key)
    if kind is str:
        return key
    if kind is int:
        if key.bit_length() > _INT_SAFE_BITS:  # type: ignore[attr-defined]
            _check_int(key, what)  # type: ignore[arg-type]
        return key
    if kind is bytes:
        return {"b": base64.b64encode(key).decode("ascii")}  # type: ignore[arg-type]
    if kind is uuid.UUID:
        return {"u": str(key)}
    if kind is tuple:
        if depth >= MAX_KEY_DEPTH:
            raise ValueError(f"{what} nests tuples deeper than {MAX_KEY_DEPTH} levels")
        return [_tagged(item, depth + 1, what) for item in key]  # type: ignore[attr-defined]
    # bool is refused on purpose: True == 1 would make two keys one agent.
    raise TypeError(
        f"{what} must be str, int, bytes, uuid.UUID or a tuple of these, "
        f"not {kind.__name__}"
    )


def _too_long(what: str, size: int, at_least: bool = False) -> ValueError:
    return ValueError(
        f"{what} encodes to {'at least ' if at_least else ''}{size} bytes; the limit is {MAX_KEY_BYTES}: "
        f"use a shorter {what} (for example a hash of it)"
    )


def _check_int(key: int, what: str) -> None:
    """Refuse an int whose decimal form is over the limit, bounding it by its bit length first."""
    # 2**(bits - 1) <= |key|: at least floor((bits - 1) * log10(2)) + 1 digits
    at_least = int((key.bit_length() - 1) * _LOG10_2) + 1 + (key < 0)
    if at_least > MAX_KEY_BYTES:
        raise _too_long(what, at_least, at_least=True)  # str() would be slow, or refused past 4300 digits
    size = len(str(key))
    if size > MAX_KEY_BYTES:
        raise _too_long(what, size)


def is_plain_key(key: object) -> bool:
    """A short ASCII str: valid as it is (valid UTF-8, cannot encode past the limit).

    The manager's fast paths skip ``check_key`` for these; ``str.isascii()`` is O(1).
    """
    return type(key) is str and len(key) <= SAFE_STR_LEN and key.isascii()


def check_key(key: object, what: str = "key") -> Any:
    """Validate a key (or partition) and return its tagged JSON form.

    Raises:
        TypeError: the key (or something nested in it) has an unsupported type.
        ValueError: the encoded key is over 1024 bytes (an int of more than 1024 digits, also
            inside a tuple), or nests too deep.
    """
    if is_plain_key(key):
        return key  # the hot case: skip the JSON
    tagged = _tagged(key, 0, what)  # checks the length of ints, inside tuples too
    if type(key) is not int:
        size = len(_dumps(tagged).encode())
        if size > MAX_KEY_BYTES:
            raise _too_long(what, size)
    return tagged


def storage_key(manager: str, partition: object, key: object) -> str:
    """The storage key of one agent's checkpoint."""
    if partition is None:  # the hot cases, spelled out: the same text as below
        if type(key) is str:
            return f"[{_json_str(manager)},null,{_json_str(key)}]"
        if type(key) is int and key.bit_length() <= _INT_SAFE_BITS:
            return f"[{_json_str(manager)},null,{key}]"
    part = None if partition is None else _tagged(partition, 0, "partition")
    return _dumps([manager, part, _tagged(key, 0, "key")])


def storage_prefix(manager: str, *partition: object) -> str:
    """Prefix of every storage key of ``manager`` (and of one partition, when given)."""
    parts: list[Any] = [manager]
    if partition:
        parts.append(None if partition[0] is None else _tagged(partition[0], 0, "partition"))
    return _dumps(parts)[:-1] + ","


def untag(value: Any) -> Any:
    """A key from its tagged JSON form (the inverse of :func:`check_key`'s result)."""
    if isinstance(value, list):
        return tuple(untag(item) for item in value)
    if isinstance(value, dict):
        if "b" in value:
            return base64.b64decode(value["b"])
        if "u" in value:
            return uuid.UUID(value["u"])
        raise ValueError(f"unknown key tag {value!r}")
    return value


def decode_storage_key(skey: str) -> tuple[str, Any, Any]:
    """``(manager, partition, key)`` from a storage key built by :func:`storage_key`.

    Raises:
        ValueError: ``skey`` was not built by keyhive.
    """
    try:
        manager, partition, key = json.loads(skey)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a keyhive storage key: {skey!r}") from exc
    if not isinstance(manager, str):
        raise ValueError(f"not a keyhive storage key: {skey!r}")
    return manager, None if partition is None else untag(partition), untag(key)

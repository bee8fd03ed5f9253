"""The default JSON codec, typed states and the checkpoint envelope."""

from __future__ import annotations

import dataclasses
import datetime
import uuid

import msgspec
import pydantic
import pytest

from keyhive import CodecError, JSONCodec
from keyhive.codecs import pack, unpack


@dataclasses.dataclass
class DC:
    name: str
    tags: list[str]
    when: datetime.datetime


class MS(msgspec.Struct):
    n: int
    ids: list[uuid.UUID]


class PM(pydantic.BaseModel):
    title: str
    count: int = 0


def test_plain_json_round_trip() -> None:
    """JSON-compatible states round-trip unchanged."""
    codec = JSONCodec()
    state = {"a": [1, 2.5, None, True, "ü"], "b": {"c": {}}}
    assert codec.decode(codec.encode(state)) == state


@pytest.mark.parametrize(
    "state",
    [
        DC("x", ["a"], datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)),
        MS(3, [uuid.uuid4()]),
        PM(title="t", count=2),
    ],
)
def test_typed_states_round_trip(state: object) -> None:
    """Dataclasses, msgspec Structs and pydantic models decode back into their type."""
    codec = JSONCodec()
    assert codec.decode(codec.encode(state), type(state)) == state


@pytest.mark.parametrize("state", [{1, 2}, {"f": lambda: 1}, object()])
def test_unencodable_states_raise_codec_error(state: object) -> None:
    """Sets, functions and arbitrary objects raise CodecError, never pickle."""
    with pytest.raises(CodecError):
        JSONCodec().encode(state)


def test_cycles_raise_codec_error() -> None:
    """A self-referencing state raises CodecError instead of recursing forever."""
    state: dict[str, object] = {}
    state["self"] = state
    with pytest.raises(CodecError):
        JSONCodec().encode(state)


def test_decode_errors_are_codec_errors() -> None:
    """Bad bytes or a state of the wrong shape for state_type raise CodecError."""
    codec = JSONCodec()
    with pytest.raises(CodecError):
        codec.decode(b"{not json")
    with pytest.raises(CodecError):
        codec.decode(b'{"n": "x", "ids": []}', MS)
    with pytest.raises(CodecError):
        codec.decode(b'{"count": 1}', PM)


def test_envelope_round_trip_and_detects_damage() -> None:
    """The envelope carries the state version and detects truncation, bit flips and foreign bytes."""
    data = pack(3, b'{"a":1}')
    assert unpack(data) == (3, b'{"a":1}')
    with pytest.raises(CodecError, match="truncated"):
        unpack(data[:-1])
    flipped = data[:-2] + bytes([data[-2] ^ 0x01]) + data[-1:]
    with pytest.raises(CodecError, match="checksum"):
        unpack(flipped)
    for bad in [b"", b"hello", b'{"a":1}', b"keyhive/1 x y z\n", b"keyhive/1 1 00000000 5"]:
        with pytest.raises(CodecError):
            unpack(bad)

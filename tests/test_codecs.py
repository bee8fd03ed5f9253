"""The default JSON codec, typed states and the checkpoint envelope."""

from __future__ import annotations

import dataclasses
import datetime
import string
import uuid
import zlib
from typing import Any

import msgspec
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyhive import CodecError, JSONCodec
from keyhive.codecs import Envelope, pack, peek_writer, unpack


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
    assert unpack(data) == (3, b'{"a":1}', "", 0, b"")
    assert unpack(data).payload == b'{"a":1}' and unpack(data).state_version == 3
    with pytest.raises(CodecError, match="truncated"):
        unpack(data[:-1])
    flipped = data[:-12] + bytes([data[-12] ^ 0x01]) + data[-11:]
    with pytest.raises(CodecError, match="checksum"):
        unpack(flipped)
    for bad in [b"", b"hello", b'{"a":1}', b"keyhive/1 x y z\n", b"keyhive/1 1 00000000 5",
                b"keyhive/2 x y z\n", b"keyhive/2 1  0 0 0\n", b"keyhive/3 1  0 0 0\n00000000"]:
        with pytest.raises(CodecError):
            unpack(bad)


V2 = [
    pack(3, b'{"total":7}', writer="0123456789abcdef", seq=41),
    pack(1, b'{"n":1}', writer="w", seq=0, meta=b'{"timers":[[1.5,"tick"]]}'),
    pack(2, b"", meta=b"m"),
]


@pytest.mark.parametrize("data", V2)
def test_every_single_bit_flip_of_a_v2_checkpoint_is_refused(data: bytes) -> None:
    """Flipping any one bit anywhere in a v2 checkpoint (header, meta, payload or CRC) is a CodecError."""
    for i in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            with pytest.raises(CodecError):
                unpack(bytes(damaged))
            with pytest.raises(CodecError):
                peek_writer(bytes(damaged))


def test_a_flipped_state_version_no_longer_reruns_migrate() -> None:
    """A state_version damaged in the header (2 -> 3, 2 -> 0) is refused instead of thawing as another version."""
    data = pack(2, b'{"total":7}', writer="a1", seq=5)
    at = data.index(b" 2 ") + 1
    for digit in (b"3", b"0"):
        with pytest.raises(CodecError, match="checksum"):
            unpack(data[:at] + digit + data[at + 1:])


def test_v1_checkpoints_still_unpack() -> None:
    """A checkpoint in the version-1 envelope unpacks with no writer, seq 0 and no meta; its damage is still caught."""
    payload = b'{"count": 5}'
    v1 = b'keyhive/1 4 76222e68 12\n{"count": 5}'  # what pack(4, payload) wrote before v2
    assert unpack(v1) == Envelope(4, payload, "", 0, b"")
    assert peek_writer(v1) is None
    with pytest.raises(CodecError, match="checksum"):
        unpack(v1[:-1] + b"6")
    with pytest.raises(CodecError, match="truncated"):
        unpack(v1[:-1])


def _craft(header: bytes, body: bytes) -> bytes:
    """A v2 checkpoint with any header and a correct CRC: only the form checks can refuse it."""
    data = header + b"\n" + body
    return data + b"%08x" % zlib.crc32(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_craft(b"keyhive/2 1 w 0 0 3", b"{}"), "truncated"),
        (_craft(b"keyhive/2 1 w 0 0 1", b"{}"), "bytes after the header, not"),
        (_craft(b"keyhive/2 1 w 0 99999999999999999999999 2", b"{}"), "truncated"),
        (_craft(b"keyhive/2 1 w 0 -1 3", b"{}"), "header"),
        (_craft(b"keyhive/2 1 w +0 0 2", b"{}"), "header"),
        (_craft(b"keyhive/2 1 w 0 0_0 2", b"{}"), "header"),
        (_craft(b"keyhive/2 1 w 0 0", b"{}"), "header"),
        (_craft(b"keyhive/2 1 w 0 0 2 7", b"{}"), "header"),
        (_craft(b"keyhive/2 x w 0 0 2", b"{}"), "header"),
        (_craft("keyhive/2 1 wé 0 0 2".encode(), b"{}"), "non-ASCII writer"),
        (_craft(b"keyhive/2 1 w\x00 0 0 2", b"{}"), "bad writer"),
        (_craft(b"keyhive/2 1 " + b"w" * 65 + b" 0 0 2", b"{}"), "bad writer"),
        (b"keyhive/2 1 w 0 0 2" + b" " * 300, "no end within"),
        (b"keyhive/2 1 w 0 0 2", "truncated checkpoint header"),
    ],
)
def test_malformed_v2_checkpoints_are_refused(data: bytes, match: str) -> None:
    """Bad headers, mismatched or absurd lengths and bad writers are CodecErrors, even with a correct CRC."""
    with pytest.raises(CodecError, match=match):
        unpack(data)
    with pytest.raises(CodecError, match=match):
        peek_writer(data)


def test_the_crc_must_be_written_exactly() -> None:
    """An uppercase CRC (the same number to int(..., 16)) is refused: the CRC field is compared as bytes."""
    data = pack(1, b"{}", writer="w", seq=1)
    crc = data[-8:]
    assert crc.upper() != crc  # this CRC has hex letters
    with pytest.raises(CodecError, match="checksum"):
        unpack(data[:-8] + crc.upper())
    with pytest.raises(CodecError, match="checksum"):
        unpack(data[:-8] + b"%08x" % ((int(crc, 16) + 1) % 2**32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"writer": "two words"}, "not a token"),
        ({"writer": "é"}, "not a token"),
        ({"writer": "x" * 65}, "not a token"),
        ({"writer": b"w"}, "writer must be a str"),
        ({"seq": -1}, "seq an int >= 0"),
        ({"seq": 1.5}, "seq an int >= 0"),
        ({"seq": 10**20}, "under 10"),
        ({"state_version": "1"}, "state_version must be an int"),
        ({"state_version": 10**20}, "under 10"),
    ],
)
def test_pack_refuses_bad_identity_or_version(kwargs: dict[str, Any], match: str) -> None:
    """pack refuses a writer that is not a short ASCII token, a negative or non-int seq, and absurd numbers."""
    args: dict[str, Any] = {"state_version": 1, "payload": b"{}", **kwargs}
    with pytest.raises(CodecError, match=match):
        pack(args.pop("state_version"), args.pop("payload"), **args)


def test_peek_writer_reads_the_identity() -> None:
    """peek_writer gives (writer, seq) of a v2 checkpoint, None for an anonymous one, without the payload."""
    assert peek_writer(pack(1, b"{}", writer="0123456789abcdef", seq=7)) == ("0123456789abcdef", 7)
    assert peek_writer(bytearray(pack(1, b"{}", writer="a:b", seq=0))) == ("a:b", 0)
    assert peek_writer(pack(1, b"{}")) is None
    with pytest.raises(CodecError, match="not a keyhive checkpoint"):
        peek_writer(b'{"a":1}')
    with pytest.raises(CodecError, match="must be bytes"):
        peek_writer("keyhive/2")  # type: ignore[arg-type]


_writers = st.text(alphabet=string.ascii_letters + string.digits + "_.:-", max_size=64)


@settings(max_examples=300, deadline=None)
@given(
    version=st.integers(-(10**19), 10**19),
    payload=st.binary(max_size=300),
    writer=_writers,
    seq=st.integers(0, 10**19),
    meta=st.binary(max_size=100),
)
def test_envelope_round_trips(version: int, payload: bytes, writer: str, seq: int, meta: bytes) -> None:
    """Whatever the version, writer, seq, meta and payload bytes (newlines, spaces included), unpack gives them back."""
    data = pack(version, payload, writer=writer, seq=seq, meta=meta)
    assert unpack(data) == Envelope(version, payload, writer, seq, meta)
    assert unpack(memoryview(data)) == unpack(data)
    assert peek_writer(data) == ((writer, seq) if writer else None)

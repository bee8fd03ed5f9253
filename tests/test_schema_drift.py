"""Schema drift: decoding into a state_type never drops stored fields in silence."""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

import msgspec
import orjson
import pydantic
import pytest

import keyhive
from keyhive import CodecError, JSONCodec
from keyhive._keys import storage_key
from keyhive.codecs import decode_state, pack

STORED = b'{"counter": 5, "name": "a"}'  # written before `counter` was renamed


class PM(pydantic.BaseModel):
    message_count: int = 0
    name: str = ""


@dataclasses.dataclass
class DC:
    message_count: int = 0
    name: str = ""


class MS(msgspec.Struct):
    message_count: int = 0
    name: str = ""


class TD(TypedDict, total=False):
    message_count: int
    name: str


RENAMED = [PM, DC, MS, TD]


@pytest.mark.parametrize("state_type", RENAMED)
def test_a_renamed_field_is_refused_naming_it_and_the_fix(state_type: Any) -> None:
    """A stored field the type does not have is a CodecError naming the field, state_version/migrate and the opt-out."""
    with pytest.raises(CodecError) as info:
        JSONCodec().decode(STORED, state_type)
    msg = str(info.value)
    assert "'counter'" in msg and "'name'" not in msg
    assert "bump state_version and define migrate()" in msg.lower()
    assert "allow_dropped_fields = True" in msg


@pytest.mark.parametrize("state_type", RENAMED)
def test_allow_dropped_fields_decodes_with_the_default(state_type: Any) -> None:
    """With allow_dropped_fields=True the stored field is dropped and the renamed one takes its default."""
    state = JSONCodec().decode(STORED, state_type, allow_dropped_fields=True)
    if state_type is TD:
        assert state == {"name": "a"}
    else:
        assert state == state_type(name="a")


@pytest.mark.parametrize("state_type", RENAMED)
def test_missing_fields_with_defaults_are_fine(state_type: Any) -> None:
    """A stored state without a field the type added (with a default) decodes: adding a field drops nothing."""
    state = JSONCodec().decode(b'{"name": "a"}', state_type)
    assert (state["name"] if isinstance(state, dict) else state.name) == "a"


class Inner(pydantic.BaseModel):
    zip_code: str = ""


class Outer(pydantic.BaseModel):
    address: Inner = Inner()
    history: list[Inner] = []
    by_name: dict[str, Inner] = {}


@dataclasses.dataclass
class DCOuter:
    inner: MS
    items: list[DC] = dataclasses.field(default_factory=list)


def test_nested_dropped_fields_are_refused_with_their_path() -> None:
    """Fields dropped inside nested models, lists and dicts of models are refused with their path."""
    codec = JSONCodec()
    data = b'{"address": {"zip": "1"}, "history": [{"zip_code": "2"}, {"zip": "3"}], "by_name": {"a": {"zip": "4"}}}'
    with pytest.raises(CodecError) as info:
        codec.decode(data, Outer)
    msg = str(info.value)
    assert "'address.zip'" in msg and "'history[1].zip'" in msg and "\"by_name['a'].zip\"" in msg
    assert "history[0]" not in msg
    with pytest.raises(CodecError, match=r"'inner\.counter'.*'items\[0\]\.extra'"):
        codec.decode(b'{"inner": {"counter": 1}, "items": [{"extra": 1}]}', DCOuter)
    with pytest.raises(CodecError, match=r"'\[1\]\.counter'"):
        codec.decode(b'[{"name": "a"}, {"counter": 1}]', list[MS])
    ok = codec.decode(b'{"address": {"zip_code": "1"}, "history": [{"zip_code": "2"}]}', Outer)
    assert ok.address.zip_code == "1" and ok.history[0].zip_code == "2"


class Extra(pydantic.BaseModel, extra="allow"):
    a: int = 0


class Computed(pydantic.BaseModel):
    a: int = 0

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def double(self) -> int:
        return 2 * self.a


class Aliased(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(populate_by_name=True)
    user_id: int = pydantic.Field(0, alias="userId")


class Renamed(msgspec.Struct, rename="camel"):
    user_id: int = 0


def test_what_the_type_keeps_is_not_refused() -> None:
    """Extra fields a model keeps, computed fields, aliases and renamed Struct fields are not drift."""
    codec = JSONCodec()
    assert codec.decode(b'{"a": 1, "b": 2}', Extra).model_extra == {"b": 2}
    assert codec.decode(codec.encode(Computed(a=2)), Computed) == Computed(a=2)
    assert codec.decode(b'{"userId": 3}', Aliased).user_id == 3
    assert codec.decode(b'{"user_id": 3}', Aliased).user_id == 3
    assert codec.decode(b'{"userId": 4}', Renamed).user_id == 4
    with pytest.raises(CodecError, match="'other'"):
        codec.decode(b'{"userId": 4, "other": 1}', Renamed)


def test_untyped_decoding_is_unchanged() -> None:
    """Without a state_type, every stored field comes back as it was."""
    assert JSONCodec().decode(STORED) == orjson.loads(STORED)


class TwoArgCodec:
    """A user codec from before allow_dropped_fields: decode takes two arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, Any]] = []

    def encode(self, state: Any) -> bytes:
        return orjson.dumps(state)

    def decode(self, data: bytes, state_type: type[Any] | None = None) -> Any:
        self.calls.append((data, state_type))
        return orjson.loads(data)


class FlagCodec(TwoArgCodec):
    """A user codec that takes the keyword."""

    def decode(self, data: bytes, state_type: type[Any] | None = None, *,  # type: ignore[override]
               allow_dropped_fields: bool = False) -> Any:
        self.calls.append((data, allow_dropped_fields))
        return orjson.loads(data)


def test_decode_state_passes_the_flag_only_to_codecs_that_take_it() -> None:
    """decode_state passes allow_dropped_fields to JSONCodec and codecs that accept it, and not to two-argument ones."""
    with pytest.raises(CodecError, match="'counter'"):
        decode_state(JSONCodec(), STORED, PM, False)
    assert decode_state(JSONCodec(), STORED, PM, True) == PM(name="a")
    old = TwoArgCodec()
    assert decode_state(old, STORED, PM, False) == orjson.loads(STORED)
    assert decode_state(old, STORED, PM, True) == orjson.loads(STORED)
    assert old.calls == [(STORED, PM), (STORED, PM)]
    new = FlagCodec()
    decode_state(new, STORED, PM, True)
    decode_state(new, STORED, PM, False)
    assert new.calls == [(STORED, True), (STORED, False)]


class Session(keyhive.Agent):
    state_type = PM

    async def handle(self, message: Any) -> Any:
        return self.state.message_count


async def test_thawing_a_drifted_checkpoint_is_a_thaw_error_and_keeps_the_bytes(make_manager: Any) -> None:
    """A checkpoint with a field the state_type lost does not thaw (ThawError naming it); its bytes stay."""
    storage = keyhive.MemoryStorage()
    async with make_manager(Session, storage=storage) as m:
        skey = storage_key(m.name, None, "k")
        data = pack(1, STORED)
        await storage.save(skey, data, expected_version=None)
        with pytest.raises(keyhive.ThawError, match="counter") as info:
            await m.get("k")
        assert isinstance(info.value.__cause__, CodecError)
        assert await m.lookup("k") is None
        assert (await storage.load(skey)).data == data  # type: ignore[union-attr]

"""Hostile input: strange keys, unencodable or oversized states, corrupt checkpoints, no pickle.

The rule for all of them: a clear error where the input is bad, the manager keeps
working for every other key, and stored bytes are never overwritten by anything that
could not be read.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import math
import pathlib
import uuid
import zlib
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import keyhive
from keyhive._keys import check_key, decode_storage_key, storage_key
from keyhive.codecs import pack
from keyhive.storage.sqlite import SQLiteStorage
from keyhive.testing import EventRecorder, FaultyStorage

from .conftest import scaled

SRC = pathlib.Path(keyhive.__file__).parent


class Box(keyhive.Agent):
    """Holds whatever it is told to hold; ``incr`` counts."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"n": 0, **params}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["n"] += 1
            return self.state["n"]
        if isinstance(message, tuple) and message[0] == "put":
            self.state[message[1]] = message[2]
        return None


def run(coro: Any) -> Any:
    """Run one coroutine on a fresh loop (Hypothesis examples are plain functions)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


# -- keys ----------------------------------------------------------------------------------------------

HOSTILE_KEYS = [
    "../../etc/passwd",
    "/",
    "..",
    ".",
    "a/b\\c",
    "C:\\Windows\\system32",
    "\x00",
    "nul\x00byte",
    "",
    " ",
    "\n\r\t",
    "é",
    "e\u0301",  # the same text as above, decomposed: a different key
    "👩‍👩‍👧‍👦",
    "\u202etxt.exe",
    "键" * 300,  # 900 bytes of UTF-8, under the limit
    "x" * 1000,
    b"\x00\xff" * 100,
    b"",
    -(2**200),
    2**200,
    0,
    uuid.UUID(int=0),
    ("a", ("b", ("c", (1, b"\x00")))),
    (),
    ((),),
    (0,) * 100,
    "%2e%2e%2f",
    "'; DROP TABLE keyhive_checkpoints; --",
    '{"b":"AA=="}',  # looks like a tagged bytes key in the storage encoding
    ["a"].__repr__(),
]


@pytest.mark.parametrize("backend", ["memory", "file", "sqlite"])
async def test_hostile_keys_round_trip_and_stay_inside_the_storage(
    make_manager: Any, tmp_path: pathlib.Path, backend: str
) -> None:
    """Every valid but hostile key gets its own agent, hibernates and thaws; files stay in their dir."""
    root = tmp_path / "store"
    storage: Any = {
        "memory": lambda: keyhive.MemoryStorage(),
        "file": lambda: keyhive.FileStorage(root),
        "sqlite": lambda: SQLiteStorage(tmp_path / "h.db"),
    }[backend]()
    try:
        async with make_manager(Box, storage=storage) as m:
            for i, key in enumerate(HOSTILE_KEYS):
                for _ in range(i % 3 + 1):
                    await m.call(key, "incr")
            assert (await m.stats()).count == len(HOSTILE_KEYS)
            for key in HOSTILE_KEYS:
                await m.stop(key)
            assert (await m.stats()).count == 0
            for i, key in enumerate(HOSTILE_KEYS):
                assert await m.call(key, "incr") == i % 3 + 2, key
        if backend == "file":
            # a few files in a tmp dir: blocking is harmless here
            files = list(tmp_path.rglob("*"))
            outside = [p for p in files if not p.is_relative_to(root) and p != root]
            assert outside == []
            assert len(list(root.glob("*.ckpt"))) == len(HOSTILE_KEYS)
    finally:
        await storage.aclose()


@pytest.mark.parametrize(
    ("key", "error", "words"),
    [
        ("x" * 1025, ValueError, "1024"),
        ("é" * 600, ValueError, "1024"),
        (tuple(["k"] * 300), ValueError, "1024"),
        (b"\x00" * 800, ValueError, "1024"),
        ((((((((((((((((((("deep",),),),),),),),),),),),),),),),),),), ValueError, "deeper"),
        (1.5, TypeError, "float"),
        (True, TypeError, "bool"),
        (None, TypeError, "NoneType"),
        (["list"], TypeError, "list"),
        ({"d": 1}, TypeError, "dict"),
        (("ok", 1.0), TypeError, "float"),
        (frozenset({1}), TypeError, "frozenset"),
        ("\ud800", ValueError, "surrogate"),
        (("ok", "\udfff"), ValueError, "surrogate"),
    ],
)
async def test_bad_keys_get_a_clear_error_and_register_nothing(
    make_manager: Any, key: Any, error: type[Exception], words: str
) -> None:
    """Huge, too deep, wrongly typed or unencodable keys are refused up front with a clear message."""
    async with make_manager(Box) as m:
        for op in (m.get, m.lookup, m.stop):
            with pytest.raises(error, match=words):
                await op(key)
        assert (await m.stats()).total == 0
        assert await m.call("fine", "incr") == 1


_atoms = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.binary(max_size=40),
    st.uuids(),
)
_keys = st.recursive(_atoms, lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=4).map(tuple),
                     max_leaves=12)


@settings(max_examples=scaled(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=_keys)
def test_generated_keys_either_work_or_are_refused_clearly(key: Any) -> None:
    """Any generated key is either refused with TypeError/ValueError or served, hibernated and thawed."""
    try:
        check_key(key)
    except (TypeError, ValueError):
        return
    assert decode_storage_key(storage_key("m", None, key)) == ("m", None, key)

    async def go() -> None:
        storage = keyhive.MemoryStorage()
        async with keyhive.InstanceManager("gen", Box, storage=storage) as m:
            assert await m.call(key, "incr") == 1
            assert list((await m.stats()).keys) == [key]
            await m.stop(key)
            assert await m.call(key, "incr") == 2

    run(go())


# -- states that cannot be encoded ----------------------------------------------------------------


def _cycle() -> Any:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


@pytest.mark.looptime
@pytest.mark.parametrize(
    "bad",
    [{1, 2}, print, lambda: 1, _cycle(), object(), {1: "int keys"}, 2**70, b"bytes", complex(1, 2)],
    ids=["set", "builtin", "lambda", "cycle", "object", "int-dict-keys", "huge-int", "bytes", "complex"],
)
async def test_unencodable_state_is_a_codec_error_at_hibernate_and_the_agent_lives(
    make_manager: Any, caplog: pytest.LogCaptureFixture, bad: Any
) -> None:
    """An unencodable state: CodecError from stop, idle hibernate keeps it alive and warns once."""
    storage = FaultyStorage()
    async with make_manager(Box, storage=storage, idle_timeout=10, retry_backoff=(1, 4),
                            close_timeout=1) as m:
        events = EventRecorder(m)
        ref = await m.get("k")
        await ref.call("incr")
        await ref.call(("put", "bad", bad))
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="keyhive"):
            await events.wait_count("hibernate_failed", 6, "k")
        assert ref.alive
        with pytest.raises(keyhive.CodecError):
            await m.stop("k")
        assert ref.alive
        assert await ref.call("incr") == 2  # still serving
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "'k'" in r.getMessage()]
        assert len(loud) == 1, [r.getMessage() for r in loud]
        assert "CodecError" in loud[0].getMessage() or "encod" in loud[0].getMessage()
        assert storage.saves == 0  # nothing was ever written
        await ref.call(("put", "bad", None))  # the agent repairs its state: the next retry saves
        await events.wait_for("hibernated", "k")
        assert await m.call("k", "incr") == 3
        await ref.wait_stopped()


async def test_unencodable_state_is_named_by_close(make_manager: Any) -> None:
    """Close cannot save an unencodable state: UnsavedAgentsError names the key; others are saved."""
    storage = keyhive.MemoryStorage()
    m = make_manager(Box, storage=storage, close_timeout=0.5)
    await m.start()
    await m.call("good", "incr")
    await m.call("bad", ("put", "s", {1}))
    with pytest.raises(keyhive.UnsavedAgentsError) as info:
        await m.close()
    assert info.value.keys == [(None, "bad")]
    assert isinstance(info.value.errors[0], keyhive.CodecError)
    assert await storage.load(storage_key(m.name, None, "good")) is not None
    assert await storage.load(storage_key(m.name, None, "bad")) is None


async def test_max_state_bytes_exceeded_is_a_clear_error(make_manager: Any) -> None:
    """A state over max_state_bytes is not written: CodecError naming the limit, agent alive, old bytes kept."""
    storage = keyhive.MemoryStorage()
    async with make_manager(Box, storage=storage, max_state_bytes=200) as m:
        await m.call("k", "incr")
        await m.stop("k")
        skey = storage_key(m.name, None, "k")
        before = await storage.load(skey)
        ref = await m.get("k")
        await ref.call(("put", "blob", "x" * 500))
        with pytest.raises(keyhive.CodecError, match="max_state_bytes=200"):
            await m.stop("k")
        assert ref.alive
        assert await storage.load(skey) == before
        await ref.call(("put", "blob", ""))
        await m.stop("k")
        assert (await storage.load(skey)).version == before.version + 1  # type: ignore[union-attr]


async def test_max_state_bytes_is_validated() -> None:
    """max_state_bytes must be a positive int."""
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_state_bytes"):
            keyhive.InstanceManager("v", Box, max_state_bytes=bad)


# -- corrupt checkpoints ------------------------------------------------------------------------------

GOOD = pack(1, b'{"n":41}')


def _flip(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p % len(out)] ^= 0xFF
    return bytes(out)


_corrupt = st.one_of(
    st.binary(max_size=200),
    st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n]),
    st.lists(st.integers(0, 10_000), min_size=1, max_size=4).map(lambda ps: _flip(GOOD, ps)),
    st.binary(max_size=60).map(lambda tail: GOOD + tail).filter(lambda b: b != GOOD),
    st.binary(max_size=60).map(lambda payload: b"keyhive/1 1 %08x %d\n" % (zlib.crc32(payload), len(payload))
                               + payload),
    st.binary(max_size=60).map(lambda payload: pack(1, payload, writer="w1", seq=3)),  # valid envelope, odd payload
    st.tuples(st.integers(-(2**70), 2**70), st.binary(max_size=20)).map(
        lambda vp: b"keyhive/1 %d %08x %d\n" % (vp[0], zlib.crc32(vp[1]), len(vp[1])) + vp[1]),
    st.sampled_from([
        b"keyhive/1 1 00000000 99999999999999999999\n",
        b"keyhive/1 1 zzzzzzzz 1\nx",
        b"keyhive/1 \n",
        b"keyhive/1 1 00000000 0",
        b"keyhive/2 1 00000000 0\n",
        b"\x80\x04\x95",  # the start of a pickle: never unpickled
        b"cos\nsystem\n(S'echo pwned'\ntR.",  # a protocol-0 pickle that would run a command
    ]),
)


async def _thaw_corrupt(data: bytes) -> None:
    storage = FaultyStorage()
    async with keyhive.InstanceManager("fuzz", Box, storage=storage) as m:
        skey = storage_key("fuzz", None, "k")
        version = await storage.inner.save(skey, data, expected_version=None)
        try:
            ref = await m.get("k")
        except keyhive.ThawError as exc:  # either outcome is allowed, so no pytest.raises
            assert exc.__cause__ is not None
            assert await m.lookup("k") is None
            assert (await m.stats()).total == 0
            with pytest.raises(keyhive.ThawError):  # fails closed every time, never starts fresh
                await m.call("k", "incr")
        else:
            # only a well-formed envelope around a decodable payload thaws
            assert data.startswith((b"keyhive/1 ", b"keyhive/2 "))
            assert ref.alive
            await ref.state()  # a strange but valid state is served; the bytes stay until a save
        stored = await storage.inner.load(skey)
        assert stored is not None and stored.data == data and stored.version == version
        assert await m.call("other", "incr") == 1  # the manager is fine
        await m.stop("other")
        if await m.lookup("k") is not None:
            # an incarnation thawed from odd bytes must not save over them on close
            await _drop(m, "k")


async def _drop(m: keyhive.InstanceManager, key: Any) -> None:
    """Forget a live agent without saving (test-only), so close leaves its bytes alone."""
    reg = m._core.regs[None]
    ref = reg.pop(key)
    ref.finished(keyhive.StopReason.STOPPED)


@settings(max_examples=scaled(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_corrupt)
def test_fuzzed_checkpoints_fail_closed_and_are_never_overwritten(data: bytes) -> None:
    """Corrupt, truncated or fuzzed checkpoint bytes: ThawError (never a crash), the bytes stay as they were."""
    run(_thaw_corrupt(data))


@pytest.mark.parametrize("cut", [0, 1, 10, len(GOOD) // 2, len(GOOD) - 1])
async def test_truncated_checkpoint_is_a_thaw_error(make_manager: Any, cut: int) -> None:
    """A checkpoint cut short (a torn write) is detected on thaw: ThawError, bytes kept, nothing started."""
    storage = keyhive.MemoryStorage()
    async with make_manager(Box, storage=storage) as m:
        skey = storage_key(m.name, None, "k")
        await storage.save(skey, GOOD[:cut], expected_version=None)
        with pytest.raises(keyhive.ThawError):
            await m.get("k")
        assert (await storage.load(skey)).data == GOOD[:cut]  # type: ignore[union-attr]


async def test_newer_state_version_refuses_to_thaw(make_manager: Any) -> None:
    """A checkpoint written by a newer state_version is a ThawError and stays as it is."""
    storage = keyhive.MemoryStorage()
    async with make_manager(Box, storage=storage) as m:
        skey = storage_key(m.name, None, "k")
        data = pack(7, b'{"n":1}')
        await storage.save(skey, data, expected_version=None)
        with pytest.raises(keyhive.ThawError, match="newer"):
            await m.get("k")
        assert (await storage.load(skey)).data == data  # type: ignore[union-attr]


class _OddStorage(keyhive.MemoryStorage):
    """A user backend that returns the wrong thing from load."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result

    async def load(self, key: str) -> Any:
        return self.result


@pytest.mark.parametrize(
    "result",
    [b"raw bytes", ("tuple", 1), {"data": GOOD}, 42, keyhive.Checkpoint("str data", 1),  # type: ignore[arg-type]
     type("NoVersion", (), {"data": GOOD})()],
    ids=["bytes", "tuple", "dict", "int", "str-data", "no-version"],
)
async def test_a_backend_returning_garbage_is_a_thaw_error(make_manager: Any, result: Any) -> None:
    """Whatever a user backend returns from load, a malformed answer is a ThawError, not a crash."""
    async with make_manager(Box, storage=_OddStorage(result)) as m:
        with pytest.raises(keyhive.ThawError):
            await m.get("k")
        assert (await m.stats()).total == 0


# -- no pickle --------------------------------------------------------------------------------------------

FORBIDDEN = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle",
             "copyreg"}


def test_no_module_imports_pickle_marshal_or_shelve() -> None:
    """No module under src/keyhive imports a deserializer that can run code."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "__import__", "import_module"
            ):
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}")
        text = path.read_text(encoding="utf-8")
        for word in ("pickle.loads", "marshal.loads", "shelve.open", "pickle.load("):
            if word in text:
                offenders.append(f"{path.relative_to(SRC)}: {word}")
    assert offenders == []


def test_nan_and_infinity_are_refused_not_turned_into_null() -> None:
    """NaN and infinities cannot round-trip through JSON: the codec refuses them instead of writing null."""
    codec = keyhive.codecs.JSONCodec()
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(keyhive.CodecError):
            codec.encode({"x": [1, {"y": bad}]})
    assert codec.decode(codec.encode({"x": None, "y": 1.5})) == {"x": None, "y": 1.5}

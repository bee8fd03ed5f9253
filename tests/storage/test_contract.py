"""The storage contract (SPEC §7), run against every backend on real servers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import keyhive
from keyhive import Checkpoint, ConflictError, SaveItem, StorageError
from keyhive._keys import storage_key, storage_prefix


async def test_missing_key_loads_none(storage: Any) -> None:
    """Loading a key that was never saved returns None; deleting it returns False."""
    assert await storage.load("nope") is None
    assert await storage.delete("nope") is False


async def test_save_then_load(storage: Any) -> None:
    """A saved checkpoint loads back with version 1, then 2 after a matching save."""
    assert await storage.save("k", b"one", expected_version=None) == 1
    assert await storage.load("k") == Checkpoint(b"one", 1)
    assert await storage.save("k", b"two", expected_version=1) == 2
    assert await storage.load("k") == Checkpoint(b"two", 2)


async def test_cas_conflicts_write_nothing(storage: Any) -> None:
    """A save with the wrong expected version raises ConflictError and leaves the stored bytes."""
    await storage.save("k", b"v1", expected_version=None)
    with pytest.raises(ConflictError):
        await storage.save("k", b"x", expected_version=None)  # must not exist yet
    with pytest.raises(ConflictError):
        await storage.save("k", b"x", expected_version=7)
    with pytest.raises(ConflictError):
        await storage.save("other", b"x", expected_version=1)  # does not exist
    assert await storage.load("k") == Checkpoint(b"v1", 1)
    assert await storage.load("other") is None


async def test_concurrent_writers_exactly_one_wins(storage: Any) -> None:
    """50 concurrent saves expecting the same version: exactly one succeeds, the rest conflict."""
    await storage.save("k", b"base", expected_version=None)
    results = await asyncio.gather(
        *(storage.save("k", f"w{i}".encode(), expected_version=1) for i in range(50)),
        return_exceptions=True,
    )
    wins = [r for r in results if r == 2]
    assert len(wins) == 1
    assert all(isinstance(r, ConflictError) for r in results if r != 2)
    winner = results.index(2)
    assert await storage.load("k") == Checkpoint(f"w{winner}".encode(), 2)

    fresh = await asyncio.gather(
        *(storage.save("new", b"n", expected_version=None) for _ in range(20)), return_exceptions=True
    )
    assert fresh.count(1) == 1


async def test_delete(storage: Any) -> None:
    """delete removes a key (True) and a new save starts it again."""
    await storage.save("k", b"x", expected_version=None)
    assert await storage.delete("k") is True
    assert await storage.load("k") is None
    assert await storage.save("k", b"y", expected_version=None) >= 1


@pytest.mark.parametrize("size", [0, 1024, 1024 * 1024])
async def test_binary_data_of_any_size(storage: Any, size: int) -> None:
    """0 B, 1 KiB and 1 MiB of arbitrary bytes round-trip exactly."""
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    await storage.save("bin", data, expected_version=None)
    loaded = await storage.load("bin")
    assert loaded is not None
    assert loaded.data == data


HOSTILE = [
    "../../etc/passwd", "/etc/passwd", "..", ".", "", "a/b\\c", "nul\x00byte", "new\nline",
    "x" * 2048, "%2e%2e%2f", "COM1", "* ? [ ]", "key with spaces ", "\t",
    "ключ", "キー", "🔑🐝", "e\u0301", "\u00e9",  # unicode (two forms of é are two keys)
]


async def test_hostile_and_unicode_keys_are_isolated(storage: Any) -> None:
    """Path-shaped, NUL, newline, huge and unicode keys each store their own data and escape nothing."""
    for i, key in enumerate(HOSTILE):
        await storage.save(key, str(i).encode(), expected_version=None)
    for i, key in enumerate(HOSTILE):
        assert await storage.load(key) == Checkpoint(str(i).encode(), 1), key
    listed = {k.key async for k in storage.iter_keys()} if hasattr(storage, "iter_keys") else set(HOSTILE)
    assert listed == set(HOSTILE)


async def test_file_keys_never_escape_the_directory(tmp_path: Any) -> None:
    """FileStorage writes only inside its directory, whatever the key."""
    root = tmp_path / "root"
    storage = keyhive.FileStorage(root)
    for key in HOSTILE:
        await storage.save(key, b"x", expected_version=None)
    outside = {p for p in tmp_path.rglob("*") if not str(p).startswith(str(root))}
    assert outside == set()
    assert all(p.parent == root for p in root.rglob("*"))


async def test_keys_of_managers_and_partitions_are_isolated(storage: Any) -> None:
    """Storage keys built for other managers or partitions never collide, and prefixes list them apart."""
    keys = [storage_key(m, p, k) for m in ["m1", "m2"] for p in [None, "p", ("t", 1)] for k in ["k", 1, b"k"]]
    assert len(set(keys)) == len(keys)
    for i, key in enumerate(keys):
        await storage.save(key, str(i).encode(), expected_version=None)
    for i, key in enumerate(keys):
        assert (await storage.load(key)).data == str(i).encode()
    if hasattr(storage, "iter_keys"):
        m1 = {k.key async for k in storage.iter_keys(storage_prefix("m1"))}
        assert m1 == {k for k in keys if k.startswith('["m1",')}
        m1p = {k.key async for k in storage.iter_keys(storage_prefix("m1", "p"))}
        assert m1p == {storage_key("m1", "p", k) for k in ["k", 1, b"k"]}


async def test_save_many_gives_per_item_results(storage: Any) -> None:
    """A batched write applies each item's compare-and-set on its own and reports each result."""
    if not hasattr(storage, "save_many"):
        pytest.skip("backend has no save_many")
    await storage.save("exists", b"old", expected_version=None)
    results = await storage.save_many([
        SaveItem("a", b"A", None),
        SaveItem("exists", b"new", 1),
        SaveItem("exists2", b"x", 5),
        SaveItem("b", b"B", None),
        SaveItem("a", b"A2", None),  # second write of 'a' in the batch must conflict
    ])
    assert results[0] == 1
    assert results[1] == 2
    assert isinstance(results[2], ConflictError)
    assert results[3] == 1
    assert isinstance(results[4], ConflictError)
    assert await storage.load("a") == Checkpoint(b"A", 1)
    assert await storage.load("exists") == Checkpoint(b"new", 2)
    assert await storage.load("exists2") is None


async def test_save_many_of_thousands(storage: Any) -> None:
    """save_many writes thousands of checkpoints and each loads back."""
    if not hasattr(storage, "save_many"):
        pytest.skip("backend has no save_many")
    items = [SaveItem(f"bulk-{i}", f"{i}".encode() * 10, None) for i in range(3000)]
    results = await storage.save_many(items)
    assert results == [1] * 3000
    loaded = await asyncio.gather(*(storage.load(it.key) for it in items[::97]))
    assert [c.data for c in loaded] == [it.data for it in items[::97]]


async def test_iter_keys_reports_version_and_size(storage: Any) -> None:
    """iter_keys streams every key under a prefix with its version and size."""
    await storage.save("p:1", b"abc", expected_version=None)
    await storage.save("p:1", b"abcd", expected_version=1)
    await storage.save("p:2", b"", expected_version=None)
    await storage.save("q:1", b"z", expected_version=None)
    found = {k.key: (k.version, k.size) async for k in storage.iter_keys("p:")}
    assert found == {"p:1": (2, 4), "p:2": (1, 0)}
    assert len([k async for k in storage.iter_keys()]) == 3
    edge = ["p\U0010ffff", "p\U0010ffff\U0010ffffz", "p\ud7ff!", "p\ue000"]  # the ends of the code space
    for key in edge:
        await storage.save(key, b"e", expected_version=None)
    assert {k.key async for k in storage.iter_keys("p\U0010ffff")} == set(edge[:2])
    assert {k.key async for k in storage.iter_keys("p\ud7ff")} == {edge[2]}
    assert {k.key async for k in storage.iter_keys("p")} == {"p:1", "p:2", *edge}


async def test_iter_keys_pages_through_many(storage: Any) -> None:
    """iter_keys streams more keys than one page holds, each exactly once."""
    if hasattr(storage, "save_many"):
        await storage.save_many([SaveItem(f"many:{i:05}", b"x", None) for i in range(2500)])
    else:
        for i in range(2500):
            await storage.save(f"many:{i:05}", b"x", expected_version=None)
    keys = [k.key async for k in storage.iter_keys("many:")]
    assert len(keys) == 2500
    assert len(set(keys)) == 2500


async def test_closed_storage_raises_storage_error(storage: Any) -> None:
    """Using a closed backend raises StorageError, not a driver exception."""
    await storage.save("k", b"x", expected_version=None)
    await storage.aclose()
    with pytest.raises(StorageError):
        await storage.load("k")
    with pytest.raises(StorageError):
        await storage.save("k", b"y", expected_version=1)


async def test_a_manager_round_trips_through_the_backend(storage: Any) -> None:
    """A manager hibernates to and thaws from the backend, state intact."""
    from tests.agents import Counter

    async with keyhive.InstanceManager("contract", Counter, storage=storage) as m:
        for _ in range(3):
            await m.call(("room", 1), "incr", partition="p")
        await m.stop(("room", 1), partition="p")
        assert await m.call(("room", 1), "incr", partition="p") == 4


async def test_a_thousand_concurrent_loads_and_saves(storage: Any) -> None:
    """A thaw storm's 1,000 concurrent loads and a burst of 1,000 saves all succeed (no pool exhaustion)."""
    results = await asyncio.gather(*(storage.save(f"c{i}", b"%d" % i, expected_version=None) for i in range(1000)))
    assert results == [1] * 1000
    loaded = await asyncio.gather(*(storage.load(f"c{i % 1100}") for i in range(2000)))
    assert [c.data if c else None for c in loaded] == [b"%d" % (i % 1100) if i % 1100 < 1000 else None
                                                         for i in range(2000)]

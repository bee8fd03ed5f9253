"""stored_keys / exists through the Ray runtime (SPEC §13): read from the client, nothing woken."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import keyhive
from keyhive._stored import ALL
from keyhive.ray import RayManager, RayRuntime

from .agents import Counter

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def stored(make_ray_manager: Any, tmp_path: Path) -> Any:
    """A running Ray-run Counter manager on a SQLite file, with a, b (partition p too) hibernated and c live."""
    manager = make_ray_manager(storage=f"sqlite:///{tmp_path / 'agents.db'}")
    await manager.start()
    try:
        for key in ("a", "b", "c"):
            await manager.call(key, "incr")
        await manager.call("a", "incr")
        await manager.call("a", "incr", partition="p")
        await manager.stop("a")
        await manager.stop("b")
        await manager.stop("a", partition="p")
        yield manager
    finally:
        await manager.shutdown_hosts()


async def test_stored_keys_lists_the_checkpoints_the_shard_hosts_wrote(stored: RayManager) -> None:
    """stored_keys() on a Ray client lists what its shard hosts hibernated, per partition, with versions."""
    records = [r async for r in stored.stored_keys()]
    assert sorted((r.key, r.partition) for r in records) == [("a", None), ("b", None)]
    assert all(r.version >= 1 and r.size > 0 for r in records)
    in_p = [(r.key, r.partition) async for r in stored.stored_keys(partition="p")]
    assert in_p == [("a", "p")]
    everything = [(r.key, r.partition) async for r in stored.stored_keys(partition=ALL)]
    assert sorted(everything, key=repr) == sorted([("a", None), ("b", None), ("a", "p")], key=repr)


async def test_exists_answers_from_storage_without_waking_anything(stored: RayManager) -> None:
    """exists() is True for a hibernated key, False for a live never-written one, and wakes no agent."""
    assert await stored.exists("a") is True
    assert await stored.exists("a", partition="p") is True
    assert await stored.exists("c") is False  # live, but its checkpoint policy has not written it
    assert await stored.exists("nobody") is False
    [r async for r in stored.stored_keys()]
    assert await stored.lookup("a") is None
    assert await stored.lookup("b") is None
    assert (await stored.stats()).keys == ["c"]


async def test_another_client_reads_the_same_checkpoints_after_close(stored: RayManager,
                                                                      make_ray_manager: Any) -> None:
    """A second client of the same manager, never started, lists them; after close it reopens on demand."""
    other = make_ray_manager(name=stored.name, storage=stored.storage)
    assert sorted([r.key async for r in other.stored_keys()]) == ["a", "b"]
    await other.close()
    assert await other.exists("b") is True
    await other.close()


async def test_listing_never_creates_a_database_file(ray_cluster: Any, tmp_path: Path) -> None:
    """exists()/stored_keys() on a SQLite URL with no file raise StorageError and create nothing."""
    path = tmp_path / "missing.db"
    manager = keyhive.InstanceManager("t-missing", Counter, storage=f"sqlite:///{path}",
                                      runtime=RayRuntime(ray_cluster.address, shards=1))
    with pytest.raises(keyhive.StorageError, match=r"missing\.db"):
        await manager.exists("a")
    with pytest.raises(keyhive.StorageError, match=r"missing\.db"):
        [r async for r in manager.stored_keys()]
    await manager.close()
    assert not path.exists()


async def test_memory_storage_is_refused_saying_what_to_use(make_ray_manager: Any) -> None:
    """With memory:// (each shard host's own memory) stored_keys/exists say to use a shared storage."""
    manager = make_ray_manager(storage="memory://")
    with pytest.raises(TypeError, match="sqlite:///"):
        manager.stored_keys()
    with pytest.raises(TypeError, match="shared storage"):
        await manager.exists("a")


async def test_no_storage_lists_nothing(make_ray_manager: Any) -> None:
    """With storage=None nothing is stored: stored_keys() is empty and exists() is False."""
    manager = make_ray_manager(storage=None)
    assert [r async for r in manager.stored_keys()] == []
    assert await manager.exists("a") is False

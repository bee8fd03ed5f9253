"""The Ray tests' fixtures (the session cluster itself, `ray_cluster`, is in tests/conftest.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import keyhive

from .cluster import Cluster

try:
    import ray  # noqa: F401
except ImportError:
    if os.environ.get("KEYHIVE_REQUIRE_SERVERS") == "1":
        raise
    collect_ignore_glob = ["test_*.py"]  # Ray is not installed: pip install 'keyhive[ray]'


# ray_cluster (the session cluster) lives in tests/conftest.py: one cluster per session,
# shared with the web-worker tests.


@pytest.fixture
def make_ray_manager(ray_cluster: Cluster) -> Callable[..., Any]:
    """Build Ray-run managers with fresh names; their shard hosts are shut down after the test."""
    from keyhive.ray import RayRuntime

    made: list[Any] = []

    def factory(agent: type[keyhive.Agent] | None = None, *, shards: int = 2, owner_ttl: float = 10.0,
                name: str | None = None, **kwargs: Any) -> Any:
        from .agents import Counter

        kwargs.setdefault("storage", None)
        manager = keyhive.InstanceManager(
            name or f"t-{uuid.uuid4().hex[:8]}", agent or Counter,
            runtime=RayRuntime(ray_cluster.address, shards=shards, owner_ttl=owner_ttl), **kwargs)
        made.append(manager)
        return manager

    factory.made = made  # type: ignore[attr-defined]
    return factory


@pytest.fixture
async def ray_manager(make_ray_manager: Callable[..., Any]) -> AsyncIterator[Any]:
    """A running Ray-run Counter manager (2 shards, no storage); its hosts are killed afterwards."""
    manager = make_ray_manager()
    await manager.start()
    try:
        yield manager
    finally:
        await manager.shutdown_hosts()

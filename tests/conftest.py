"""Shared agents and fixtures for the core tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import keyhive

from .agents import Counter


@pytest.fixture(autouse=True, scope="session")
def _current_event_loop() -> Any:
    """Give the main thread a current loop that is closed at the end.

    pytest-asyncio's policy switch calls ``asyncio.get_event_loop()``, which creates a
    loop when none is set and never closes it (pytest-asyncio issue #724); with
    warnings as errors its ResourceWarning would fail an unrelated test.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture
def make_manager() -> Any:
    """Build managers that are closed (and so unregistered) at the end of the test."""
    made: list[keyhive.InstanceManager] = []
    counter = iter(range(1_000_000))

    def factory(agent: type[keyhive.Agent] = Counter, **kwargs: Any) -> keyhive.InstanceManager:
        kwargs.setdefault("storage", keyhive.MemoryStorage())
        name = kwargs.pop("name", f"test-{next(counter)}")
        manager = keyhive.InstanceManager(name, agent, **kwargs)
        made.append(manager)
        return manager

    yield factory
    # Managers left running by a test are closed by the test's own loop teardown below.
    for manager in made:
        assert not manager.running, f"{manager!r} was left running by the test"


@pytest.fixture
async def manager(make_manager: Callable[..., keyhive.InstanceManager]) -> AsyncIterator[keyhive.InstanceManager]:
    """A running Counter manager on its own memory storage, no idle timeout."""
    async with make_manager() as m:
        yield m


# -- session servers, shared by every directory (one of each per session) ---------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A private redis-server on 127.0.0.1, started for the session."""
    from .storage import servers

    with servers.redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A private PostgreSQL cluster on 127.0.0.1, started for the session."""
    from .storage import servers

    with servers.postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A private Ray cluster for the session (tests/ray/cluster.py); this process is its driver."""
    from .ray.cluster import local_cluster  # sets Ray's environment: before Ray is imported

    pytest.importorskip("ray", reason="needs keyhive[ray]")

    with local_cluster() as cluster:
        import ray

        ray.init(address=cluster.address, namespace="keyhive", log_to_driver=False,
                 configure_logging=False)
        try:
            yield cluster
        finally:
            ray.shutdown()

"""The Ray runtime: one live agent per key across every process of a Ray cluster (SPEC §11).

::

    from keyhive.ray import RayRuntime     # pip install 'keyhive[ray]'
    rooms = keyhive.InstanceManager("rooms", Room, storage="postgresql://...",
                                    runtime=RayRuntime(address="auto", shards=16))

Agents run in ``shards`` named, detached Ray actors (shard hosts), each running a local
manager for the keys that hash to it; every process that builds the manager reaches the
same hosts. See ``docs/ray.md``.
"""

from __future__ import annotations

import math
from typing import Any

try:
    import ray as _ray  # noqa: F401  # fail here, with the extra's name, not on first use
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keyhive.ray needs Ray: pip install 'keyhive[ray]'"
    ) from exc

from .._manager import InstanceManager
from ._client import RayManager, RemoteRef, RemoteSubscription
from ._hash import shard_of
from ._wire import RemoteError

__all__ = ["RayManager", "RayRuntime", "RemoteError", "RemoteRef", "RemoteSubscription", "shard_of"]


class RayRuntime:
    """Where a manager's agents run: ``shards`` shard-host actors on a Ray cluster.

    * ``address``: passed to ``ray.init`` on ``start()`` when Ray is not initialised yet
      (``"auto"``: the cluster this machine belongs to; ``"ray://host:10001"``; ``None``:
      a new local one);
    * ``shards``: how many shard hosts (Ray actors, ~100 MiB each) share the keys;
    * ``owner_ttl``: seconds after which a client process's attachments are dropped when it
      stops renewing them (it renews every ``owner_ttl / 3``);
    * ``namespace``: the Ray namespace of the named shard hosts;
    * ``max_concurrency``: concurrent Ray calls each shard host accepts;
    * ``actor_options``: more ``ActorClass.options(...)`` for the hosts (e.g. ``num_cpus``,
      ``resources``, ``runtime_env``);
    * ``host_setup``: ``"module:function"``, called once in each shard host when it starts,
      with the host's local manager before that manager starts (``function(manager)``, sync
      or async): e.g. to set up OpenTelemetry in the host process (a tracer provider with
      its exporter, ``instrument(manager)``). The module must be importable by the workers.

    Raises:
        TypeError, ValueError: an argument has the wrong type or value (the message says
            what to write).
    """

    __slots__ = ("actor_options", "address", "host_setup", "max_concurrency", "namespace", "owner_ttl",
                 "shards")

    def __init__(self, address: str | None = "auto", *, shards: int = 16, owner_ttl: float = 10.0,
                 namespace: str = "keyhive", max_concurrency: int = 4096,
                 actor_options: dict[str, Any] | None = None, host_setup: str | None = None) -> None:
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str such as 'auto' or 'ray://host:10001', or None; "
                            f"not {type(address).__name__}")
        if isinstance(shards, bool) or not isinstance(shards, int):
            raise TypeError(f"shards must be an int such as 16, not {type(shards).__name__}")
        if shards < 1:
            raise ValueError(f"shards must be >= 1 (e.g. shards=16), not {shards}")
        if isinstance(owner_ttl, bool) or not isinstance(owner_ttl, int | float):
            raise TypeError(f"owner_ttl must be seconds (e.g. owner_ttl=10.0), "
                            f"not {type(owner_ttl).__name__}")
        if not math.isfinite(owner_ttl) or owner_ttl <= 0:
            raise ValueError(f"owner_ttl must be a positive number of seconds, not {owner_ttl!r}")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty str such as 'keyhive', not {namespace!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive int, not {max_concurrency!r}")
        if actor_options is None:
            actor_options = {}
        if not isinstance(actor_options, dict):
            raise TypeError(f"actor_options must be a dict of Ray actor options, not "
                            f"{type(actor_options).__name__}")
        if host_setup is not None:
            module, sep, function = host_setup.partition(":") if isinstance(host_setup, str) else ("", "", "")
            if not (sep and module and function):
                raise ValueError(f"host_setup must name a function as 'module:function' (e.g. "
                                 f"'myapp.tracing:setup_host'), or be None; not {host_setup!r}")
        self.host_setup = host_setup
        self.address = address
        self.shards = shards
        self.owner_ttl = float(owner_ttl)
        self.namespace = namespace
        self.max_concurrency = max_concurrency
        self.actor_options = dict(actor_options)

    def __repr__(self) -> str:
        return (f"RayRuntime(address={self.address!r}, shards={self.shards}, "
                f"owner_ttl={self.owner_ttl}, namespace={self.namespace!r})")

    def manager_type(self) -> type[InstanceManager]:
        """The manager class that serves a manager's API through the shard hosts."""
        return RayManager

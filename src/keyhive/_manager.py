"""InstanceManager: the public door: the API, the registry and single-flight activation.

The hot paths (``get`` of a live key, ``call``, ``lookup``) live here and read the
registry dict directly. Everything else is a room of its own, reached through the
manager's :class:`~keyhive._core.Core`:

* ``_options.py``: the options and their validation;
* ``_checkpoint.py``: one agent's storage I/O (encode, envelope, thaw, writes);
* ``_hibernation.py``: the reaper, batched hibernate, the failure policy;
* ``_commit.py``: durable turns and write-behind (``checkpoint=``);
* ``_drain.py``: close's drain rounds and ``UnsavedAgentsError``;
* ``_lease.py``: one owner per namespace across processes;
* ``_ref.py`` / ``_lifecycle.py``: the turn, and the pure lifecycle of one incarnation.

**The closing rule.** ``get``'s fast path reads only ``self._default_reg``. When close
begins, that attribute is pointed at an empty dict (:data:`_CLOSED_REGISTRY`, never
written), so no fast path can hand out a live ref once close has begun; every other path
checks the manager's state first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from ._agent import Agent
from ._bounds import Evictor, Sweeper, check_retention
from ._checkpoint import CheckpointIO
from ._commit import Committer
from ._core import CLOSED, CLOSING, NEW, OPEN, Core
from ._drain import drain
from ._errors import AgentStopped, ManagerClosed, NotFound, StorageError, ThawError
from ._events import Event, EventKind, StopReason
from ._hibernation import Reaper
from ._keys import SAFE_STR_LEN, check_key, is_plain_key
from ._lease import LeaseKeeper, has_leases
from ._lifecycle import RUNNING, STARTING
from ._options import check_agent, parse_options
from ._ref import AgentRef
from ._stored import ALL, StoredRecord
from ._stored import exists as _stored_exists
from ._stored import stored_keys as _stored_keys
from ._timer import DeadlineWheel
from ._timers import TimerService
from ._timers import restore as restore_timers
from .codecs import Codec
from .storage import MemoryStorage, default_storage, from_url, is_storage

__all__ = ["InstanceManager", "Stats", "get_manager"]

logger = logging.getLogger("keyhive")

_running: dict[str, InstanceManager] = {}
_closing: dict[str, InstanceManager] = {}  # still draining: its agents are live until saved
_OMITTED: Any = object()
_CLOSED_REGISTRY: Mapping[Any, AgentRef] = MappingProxyType({})  # what get's fast path sees once closing
_warned_no_leases: set[str] = set()  # backend types already reported as single-process


def get_manager(name: str) -> InstanceManager:
    """The running manager called ``name``.

    Raises:
        NotFound: no manager of that name is running in this process.
    """
    try:
        return _running[name]
    except KeyError:
        raise NotFound(f"no running manager named {name!r}") from None


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a manager, for one partition (``count``, ``keys``) and in total."""

    count: int
    keys: list[Any]
    partition: Any = None
    total: int = 0
    attached: int = 0
    registry_partitions: int = 1
    running: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    max_live: int | None = None
    over_cap: bool = False


class InstanceManager:
    """One live agent per key: started on demand, hibernated when idle, thawed on ``get``.

    Use it as ``async with manager:``; on exit every live agent hibernates, then stops.
    See SPEC §2 and the README for the options; beyond SPEC's:

    * ``codec``: how states become bytes (default :class:`keyhive.codecs.JSONCodec`);
    * ``max_state_bytes``: refuse to write bigger checkpoints (``CodecError``);
    * ``close_timeout``: how long ``close`` keeps trying to save agents;
    * ``calls_touch``: make ``call``/``cast`` restart the idle timer like ``touch``;
    * ``hibernate_batch``: how many checkpoints go to storage in one batch;
    * ``retry_backoff``: ``(first, max)`` seconds between hibernate retries;
    * ``timer_resolution``: idle deadlines are rounded up to this many seconds;
    * ``timer_poll``: seconds between looks at the storage's due-time index, for timers
      of hibernated agents (SPEC §12; default 1.0);
    * ``timer_retries``: how often a timer whose handler raises is retried (with
      ``retry_backoff``) before it is dropped (default 5);
    * ``validate_state``: encode the state after every turn, so that the handler that
      made it unencodable is the one that fails (for tests and development).
    """

    def __new__(cls, *args: Any, runtime: Any = None, **kwargs: Any) -> InstanceManager:
        """``runtime=None`` is this class; a runtime object (``keyhive.ray.RayRuntime``) picks
        the manager class that serves the same API from other processes."""
        if runtime is None:
            return super().__new__(cls)
        manager_type = getattr(runtime, "manager_type", None)
        if not callable(manager_type):
            raise TypeError(
                f"runtime must be a keyhive runtime such as keyhive.ray.RayRuntime(address='auto'), "
                f"or None for this process; got {type(runtime).__name__}"
            )
        sub = manager_type()
        if not (isinstance(sub, type) and issubclass(sub, cls)):
            raise TypeError(
                f"{type(runtime).__name__}.manager_type() must return an InstanceManager subclass"
            )
        return super().__new__(sub)

    def __init__(
        self,
        name: str,
        agent: type[Agent],
        *,
        runtime: Any = None,
        idle_timeout: float | timedelta | None = None,
        storage: Any = _OMITTED,
        registry_partitions: int | None = None,
        partition: Any = None,
        agent_opts: Mapping[str, Any] | None = None,
        checkpoint: str | float = "idle",
        turn_timeout: float | None = None,
        storage_timeout: float | None = 30.0,
        lease_ttl: float = 10.0,
        lease_wait: float = 0.0,
        subscriber_buffer: int = 1000,
        max_live: int | None = None,
        checkpoint_ttl: float | timedelta | None = None,
        codec: Codec | None = None,
        max_state_bytes: int | None = None,
        close_timeout: float | timedelta = 30.0,
        calls_touch: bool = False,
        hibernate_batch: int = 512,
        retry_backoff: tuple[float, float] = (0.5, 30.0),
        timer_resolution: float = 0.01,
        validate_state: bool = False,
        timer_poll: float | timedelta = 1.0,
        timer_retries: int = 5,
        _shard: int | None = None,
        _takeover: bool = False,
        _shards: int | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if not name:
            raise ValueError("name must not be empty, e.g. InstanceManager('sessions', MyAgent)")
        agent = check_agent(agent)
        options = parse_options(
            idle_timeout=idle_timeout, registry_partitions=registry_partitions, partition=partition,
            agent_opts=agent_opts, codec=codec, max_state_bytes=max_state_bytes,
            close_timeout=close_timeout, calls_touch=calls_touch, hibernate_batch=hibernate_batch,
            retry_backoff=retry_backoff, timer_resolution=timer_resolution,
            storage_timeout=storage_timeout, turn_timeout=turn_timeout, checkpoint=checkpoint,
            validate_state=validate_state, lease_ttl=lease_ttl, lease_wait=lease_wait,
            subscriber_buffer=subscriber_buffer, max_live=max_live, checkpoint_ttl=checkpoint_ttl,
            shard=_shard, takeover=_takeover, timer_poll=timer_poll, timer_retries=timer_retries,
            shards=_shards,
        )
        # storage: a backend object, a URL (the manager owns what it builds), or None
        self._storage_url: str | None = None
        if storage is _OMITTED:
            storage = default_storage()
        elif isinstance(storage, str):
            self._storage_url = storage
            storage = from_url(storage)  # validates now; connects on first use
        elif storage is not None and not is_storage(storage):
            raise TypeError(
                f"storage must be a keyhive.Storage, a URL such as 'sqlite:///agents.db', or None; "
                f"got {type(storage).__name__}"
            )
        check_retention(storage, options.checkpoint_ttl)
        self.name = name
        self.agent: type[Agent] = agent
        self.registry_partitions = options.registry_partitions
        self.partition = options.partition
        self.agent_opts: Mapping[str, Any] = options.agent_opts
        self._options = options
        self._core = Core(name, agent, options, CheckpointIO(name, storage, options))
        self._default_reg: Mapping[Any, AgentRef] = _CLOSED_REGISTRY
        self._closer: asyncio.Task[None] | None = None
        if options.max_live is not None and type(self).get is InstanceManager.get:
            # max_live: a get is a use (_bounds.py's clock). Only then does get pay for it
            # (measured: +3 ns for the instance attribute, +3 ns for the store); without
            # max_live, get is the class's own, untouched.
            self.get = self._get_used  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"<InstanceManager {self.name!r} agent={self.agent.__name__} {self._core.state}>"

    @property
    def idle_timeout(self) -> float | None:
        """Seconds before an unattached agent hibernates; ``None``: never."""
        return self._options.idle_timeout

    @property
    def storage(self) -> Any:
        """The storage backend, or ``None`` when hibernate/thaw is off."""
        return self._core.io.storage

    @property
    def running(self) -> bool:
        """Whether the manager is started and not closing."""
        return self._core.state is OPEN

    def _owns_storage(self) -> bool:
        """A manager closes only the backend it built itself from a URL (never the shared
        process-wide memory storage)."""
        storage = self._core.io.storage
        return self._storage_url is not None and storage is not None and storage is not default_storage()

    # -- start and close -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the manager (``async with manager`` does this).

        With a shared storage it takes the manager's lease (SPEC §10) and checks the
        storage with one round trip.

        Raises:
            ValueError: another running manager has the same name in this process.
            OwnedElsewhere: another live process holds this manager's lease.
            StorageError: the storage cannot be reached (the message says what to check).
        """
        core = self._core
        if core.state is OPEN:
            return
        if core.state is CLOSING:
            raise RuntimeError(f"manager {self.name!r} is still closing")
        if self.name in _running:
            raise ValueError(f"a manager named {self.name!r} is already running in this process")
        if self.name in _closing:
            raise ValueError(
                f"a manager named {self.name!r} is still closing in this process: await its close() "
                f"first, or a key could be live in both"
            )
        loop = asyncio.get_running_loop()
        if self._storage_url is not None and core.state is CLOSED:
            core.io = CheckpointIO(self.name, from_url(self._storage_url), self._options)
        storage = core.io.storage
        _running[self.name] = self  # claimed now: a second start() in this process fails above
        try:
            if storage is not None:
                await self._check_storage(storage)
            core.loop = loop
            core.wheel = DeadlineWheel(loop, self._options.timer_resolution, self._on_due)
            core.reaper = Reaper(core)
            core.committer = Committer(core) if self._options.checkpoint != "idle" else None
            core.regs = {}
            core.default_reg = core.regs[self.partition] = {}
            cap, ttl = self._options.max_live, self._options.checkpoint_ttl
            core.evictor = None if cap is None else Evictor(core, cap)
            core.sweeper = None if ttl is None or storage is None else Sweeper(core, ttl)
            core.state = OPEN
            if storage is not None and has_leases(storage) and core.io.fenced:
                core.lease = LeaseKeeper(core)
                await core.lease.acquire(wait=self._options.lease_wait, takeover=self._options.takeover)
            else:
                core.lease = None
                self._say_single_process(storage)
            core.timers = TimerService(core, self._wake_for_timers)
            core.timers.start()  # the first poll catches up on what fell due while nothing ran
            if core.sweeper is not None:
                core.sweeper.start()
        except BaseException:
            core.state = NEW if core.state is not CLOSED else CLOSED
            if _running.get(self.name) is self:
                del _running[self.name]
            if core.lease is not None:
                await core.lease.release()
                core.lease = None
            core.regs = {}
            if self._owns_storage():
                with contextlib.suppress(Exception):
                    await storage.aclose()
            raise
        self._default_reg = core.default_reg

    async def _check_storage(self, storage: Any) -> None:
        """One cheap round trip (a backend's ``ping``) so that a wrong URL fails here."""
        ping = getattr(storage, "ping", None)
        if not callable(ping):
            return
        try:
            async with asyncio.timeout(self._options.storage_timeout):
                await ping()
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"{self.name}: storage {storage!r} cannot be reached: {exc!r}") from exc

    @staticmethod
    def _say_single_process(storage: Any) -> None:
        """Log once per backend type that a shared storage without leases is single-process."""
        if storage is None or isinstance(storage, MemoryStorage):
            return  # nothing shared: one process is all there is
        kind = type(storage).__qualname__
        if kind not in _warned_no_leases:
            _warned_no_leases.add(kind)
            logger.warning("keyhive: storage %s has no lease methods (acquire_lease, release_lease, "
                           "read_lease): managers on it must run in one process only", kind)

    async def __aenter__(self) -> InstanceManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Hibernate every live agent, then stop them all; shielded from cancellation.

        Raises:
            UnsavedAgentsError: some agents could not be saved before ``close_timeout``;
                their keys are listed with why. Everything else was saved.
        """
        state = self._core.state
        if state is NEW or (state is CLOSED and self._closer is None):
            return
        if self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closer)

    aclose = close

    async def _close(self) -> None:
        """Close: the fast path sees no registry, queued stops and timers end, queued durable
        writes land, the drain hibernates everyone, tasks are cancelled, the lease is released."""
        core = self._core
        core.state = CLOSING
        self._default_reg = _CLOSED_REGISTRY  # the closing rule (module docstring)
        if _running.get(self.name) is self:
            del _running[self.name]
        _closing[self.name] = self
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.close_timeout
        core.wheel.close()
        core.reaper.close()
        if core.timers is not None:
            core.timers.close()
        if core.sweeper is not None:
            core.sweeper.close()
        try:
            if core.reaper.task is not None:
                await asyncio.wait([core.reaper.task], timeout=max(0.0, deadline - loop.time()))
            if core.committer is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        await core.committer.settle()
            await drain(core, [ref for reg in core.regs.values() for ref in reg.values()], deadline)
        finally:
            current = asyncio.current_task()
            for task in list(core.tasks):
                if task is not current and not task.done():
                    task.cancel()
            if core.tasks:
                await asyncio.wait([t for t in core.tasks if t is not current], timeout=1.0)
            core.regs = {}
            core.default_reg = {}
            if core.lease is not None:
                await core.lease.release()
                core.lease = None
            if self._owns_storage():
                try:
                    await core.io.storage.aclose()
                except Exception:
                    logger.exception("keyhive: %s: closing storage failed", self.name)
            core.state = CLOSED
            self._closer = None
            if _closing.get(self.name) is self:
                del _closing[self.name]

    def _check_open(self) -> None:
        if self._core.state is not OPEN:
            raise ManagerClosed(f"manager {self.name!r} is not running ({self._core.state})")

    def _on_due(self, refs: list[Any]) -> None:
        self._core.reaper.on_due(refs)

    # -- get and friends ----------------------------------------------------------------------

    async def get(self, key: Any, *, initial_state: Mapping[str, Any] | None = None,
                  partition: Any = None) -> AgentRef:
        """The live agent for ``key``: running, thawed from its checkpoint, or started fresh.

        Concurrent gets of one key share one thaw and one start.

        Raises:
            ThawError: a checkpoint exists but cannot be restored; nothing was started.
            TypeError, ValueError: the key is not a valid key.
            ManagerClosed: the manager is not running.
            OwnedElsewhere: this manager's lease is held by another process.
        """
        if partition is None and type(key) is str:
            reg = self._default_reg
            ref = reg.get(key)
            if ref is not None:
                if ref._status is RUNNING:
                    return ref
            elif initial_state is None and reg is not _CLOSED_REGISTRY and is_plain_key(key):
                return await self._activate(reg, key, self.partition, None)  # type: ignore[arg-type]
        elif type(key) is int and partition is None and key.bit_length() <= 64:  # valid as it is
            reg = self._default_reg
            ref = reg.get(key)
            if ref is not None:
                if ref._status is RUNNING:
                    return ref
            elif initial_state is None and reg is not _CLOSED_REGISTRY:
                return await self._activate(reg, key, self.partition, None)  # type: ignore[arg-type]
        return await self._get(key, initial_state, self.partition if partition is None else partition)

    async def _get_used(self, key: Any, *, initial_state: Mapping[str, Any] | None = None,
                        partition: Any = None) -> AgentRef:
        """``get`` with ``max_live``: the same, and a live key is marked used for the clock."""
        if partition is None and type(key) is str:
            ref = self._default_reg.get(key)
            if ref is not None and ref._status is RUNNING:
                ref._used = True
                return ref
        return await InstanceManager.get(self, key, initial_state=initial_state, partition=partition)

    async def _get(self, key: Any, initial_state: Mapping[str, Any] | None, partition: Any) -> AgentRef:
        """``get`` off the fast path: validate, then wait out a start or stop in progress."""
        self._check_open()
        check_key(key)
        if initial_state is not None and not isinstance(initial_state, Mapping):
            raise TypeError(f"initial_state must be a mapping, not {type(initial_state).__name__}")
        while True:
            reg = self._core.registry(partition, create=True)  # again after every wait: it may be new
            assert reg is not None
            ref = reg.get(key)
            if ref is None:
                return await self._activate(reg, key, partition, initial_state)
            if ref._status is RUNNING:
                ref._used = True
                return ref
            await ref._changed()  # starting or stopping: wait, then look again
            self._check_open()

    async def lookup(self, key: Any, *, partition: Any = None) -> AgentRef | None:
        """The live agent for ``key``, or ``None``; never starts or thaws anything."""
        if (partition is None and type(key) is str
                and len(key) <= SAFE_STR_LEN and key.isascii()):  # is_plain_key(), inlined: 27 ns
            ref = self._default_reg.get(key)  # a valid key of the default partition
            if ref is not None or self._default_reg is not _CLOSED_REGISTRY:
                return None if ref is None or ref._status is STARTING else ref
        self._check_open()
        check_key(key)
        reg = self._core.registry(self.partition if partition is None else partition, create=False)
        ref = None if reg is None else reg.get(key)
        if ref is None or ref._status is STARTING:
            return None
        return ref

    async def call(self, key: Any, message: Any, *, timeout: float | None = 5.0,
                   partition: Any = None) -> Any:
        """``get(key)`` then ``ref.call(message)``, getting again once if the agent stopped between."""
        ref = self._default_reg.get(key) if partition is None and type(key) is str else None
        if ref is None or ref._status is not RUNNING:  # else: what get() would return, inlined
            ref = await self.get(key, partition=partition)
        try:
            return await ref.call(message, timeout=timeout)
        except AgentStopped:
            if ref.alive:
                raise
        ref = await self.get(key, partition=partition)
        return await ref.call(message, timeout=timeout)

    @asynccontextmanager
    async def attach(self, key: Any, *, partition: Any = None) -> AsyncIterator[AgentRef]:
        """``async with manager.attach(key) as ref``: the agent stays alive inside the block."""
        ref = await self.get(key, partition=partition)
        owner = object()
        await ref.attach(owner)
        try:
            yield ref
        finally:
            await ref.detach(owner)

    async def stop(self, key: Any, *, partition: Any = None) -> None:
        """Stop the agent for ``key``: when this returns, ``on_stop`` ran and the checkpoint is written.

        Stops even while attached.

        Raises:
            NotFound: no live agent for ``key``.
            StorageError: the checkpoint could not be written; the agent keeps running.
            ConflictError: newer state is stored; the agent keeps running.
            ReentrancyError: called from the agent's own turn (use ``self.stop()`` there).
        """
        self._check_open()
        check_key(key)
        core = self._core
        reg = core.registry(self.partition if partition is None else partition, create=False)
        waited = False
        while True:
            ref = None if reg is None else reg.get(key)
            if ref is None:
                if waited:
                    return  # it stopped (and saved) while we waited
                raise NotFound(f"no live agent for key {key!r} in manager {self.name!r}")
            if ref._status is STARTING:
                with contextlib.suppress(Exception):  # a failed start: look again
                    await ref._changed()
                continue
            try:
                await ref._acquire()
            except AgentStopped:  # it stopped while we waited for its turn
                waited = True
                continue
            if ref._status is not RUNNING:  # stopped by someone else meanwhile
                ref._release()
                waited = True
                continue
            ref.begin_stop()
            task = core.spawn(core.reaper.hibernate([ref], StopReason.STOPPED))
            try:
                errors = await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and current is not None and not current.cancelling():
                    # close gave up on this write at its deadline; our caller was not cancelled
                    raise ManagerClosed(
                        f"manager {self.name!r} closed before the checkpoint of key {key!r} was written"
                    ) from None
                raise
            if errors[0] is not None:
                raise errors[0]
            return

    async def stats(self, *, partition: Any = None) -> Stats:
        """Live agents of one partition (``count``, ``keys``) and of the whole manager.

        Awaited like every manager call, so that a runtime in other processes can serve it.
        """
        core = self._core
        reg = core.registry(self.partition if partition is None else partition, create=False)
        keys = [] if reg is None else [k for k, r in reg.items() if r._status is not STARTING]
        refs = core.live_refs()
        cap = self._options.max_live
        evictor = core.evictor
        return Stats(
            count=len(keys), keys=keys, partition=partition, total=len(refs),
            attached=sum(1 for r in refs if r._owners is not None),
            registry_partitions=self.registry_partitions, running=core.state is OPEN,
            counters=dict(core.counters), max_live=cap,
            over_cap=evictor.over_cap if evictor is not None else cap is not None and len(refs) > cap,
        )

    # -- stored checkpoints ---------------------------------------------------------------------

    def stored_keys(self, *, partition: Any = None) -> AsyncIterator[StoredRecord]:
        """``async for record in manager.stored_keys()``: this manager's stored checkpoints.

        Records have ``.key``, ``.partition``, ``.version``, ``.size`` and ``.updated_at``
        (seconds since the epoch, when the backend knows), streamed from storage in constant
        memory; nothing is woken. ``partition=None`` lists the manager's own default partition
        (its ``partition=`` option), like ``get``; ``partition=keyhive._stored.ALL`` every one.
        With ``storage=None`` nothing is stored and nothing is listed.

        Raises:
            TypeError: the storage cannot list its keys (no ``iter_keys``).
            StorageError: the backend failed; its exception is ``__cause__``.
        """
        storage = self._core.io.storage
        part = self.partition if partition is None else partition
        if storage is None:
            if part is not ALL:
                self._core.registry(part, create=False)  # a bad partition fails as in get
            return _nothing()
        return _stored_keys(storage, self.name, partition=part)

    async def exists(self, key: Any, *, partition: Any = None) -> bool:
        """Whether a checkpoint of ``key`` is stored (``partition=None``: the default partition).

        Checks storage only: a live agent never written yet is not there; nothing is woken.

        Raises:
            TypeError, ValueError: a bad key or partition (as ``get`` would raise).
            StorageError: the backend failed; its exception is ``__cause__``.
        """
        part = self.partition if partition is None else partition
        storage = self._core.io.storage
        if storage is None:
            check_key(key)
            self._core.registry(part, create=False)
            return False
        async with asyncio.timeout(self._options.storage_timeout):
            return await _stored_exists(storage, self.name, part, key)

    async def agents(self) -> list[AgentRef]:
        """Every live agent of every partition (for dashboards and tools)."""
        return self._core.live_refs()

    # -- events -------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every lifecycle event; returns the unsubscribe function.

        Callbacks run synchronously in the loop: keep them short (hand work to a queue).
        An exception in a callback is logged and does not reach the manager.
        """
        if not callable(callback):
            raise TypeError("subscribe() takes a callable")
        core = self._core
        core.listeners = (*core.listeners, callback)

        def unsubscribe() -> None:
            listeners = list(core.listeners)
            if callback in listeners:
                listeners.remove(callback)
                core.listeners = tuple(listeners)

        return unsubscribe

    # -- activation -----------------------------------------------------------------------------

    async def _activate(self, reg: dict[Any, AgentRef], key: Any, partition: Any,
                        initial_state: Mapping[str, Any] | None) -> AgentRef:
        """Start (or thaw) the one incarnation of ``key``; concurrent gets wait on it."""
        core = self._core
        ref = AgentRef(core, key, partition)
        reg[key] = ref
        thawed = False
        try:
            if core.evictor is not None:  # max_live: first, so that the count matches unregister
                await core.evictor.admit()
            sweeper = core.sweeper
            if sweeper is not None and sweeper.deleting:  # checkpoint_ttl: a delete in flight
                await sweeper.wait_for(core.io.key(ref))
            lease = core.lease
            if lease is not None and not lease.held:
                await lease.acquire(wait=0.0)  # lost earlier: take it again, or OwnedElsewhere
            agent = self.agent()
            agent._ref = ref
            ref._agent = agent
            if core.io.storage is not None:
                try:
                    thawed, meta = await core.io.thaw(ref, agent)
                    if meta:
                        restore_timers(ref, meta)  # before on_start, which may schedule too
                except ThawError as exc:
                    self._thaw_failed(ref, exc)
                    raise
            if core.state is not OPEN:
                raise ManagerClosed(f"manager {self.name!r} closed while key {key!r} was starting")
            if not thawed:
                params = {} if initial_state is None else dict(initial_state)
                # the base class's initial_state is dict(params): params is that already
                agent.state = agent.initial_state(params) if core.custom_state else params
            if core.runs_on_start:
                ref._dirty = True  # the hook may change the state
                await agent.on_start(thawed)
                if core.state is not OPEN:
                    raise ManagerClosed(f"manager {self.name!r} closed while key {key!r} was starting")
        except BaseException as exc:
            if reg.get(key) is ref:
                core.unregister(ref)
            ref.start_failed(StopReason.STOPPED)
            ref._agent = None
            # a cancelled activation lets the waiters try again; a failed one fails them too
            ref.notify(exc if isinstance(exc, Exception) else None)
            raise
        ref.activated()
        wheel = core.wheel
        if ref.started(wheel.now(), core.idle_timeout):
            wheel.arm(ref, ref._deadline)  # type: ignore[arg-type]
        core.counters["thawed" if thawed else "started"] += 1
        if core.listeners:
            core.emit(EventKind.THAWED if thawed else EventKind.STARTED, ref)
        if ref._x is not None:
            if ref._x.timers is not None:
                core.timers.rearm(ref)  # type: ignore[union-attr]  # set while open; due ones fire at once
            ref.notify()
            reason = ref.take_stop_request()
            if reason is not None:  # on_start called self.stop()
                ref._request_stop(reason)
        return ref

    async def _wake_for_timers(self, key: Any, partition: Any) -> None:
        """The timer poller's ``get``: the partition as stored (``None`` is the null one)."""
        await self._get(key, None, partition)

    def _thaw_failed(self, ref: AgentRef, exc: BaseException) -> None:
        core = self._core
        core.counters["thaw_failures"] += 1
        logger.error("keyhive: %s: thaw of key %r failed: %r", self.name, ref.key, exc.__cause__ or exc)
        if core.listeners:
            core.emit(EventKind.THAW_FAILED, ref, error=exc.__cause__ or exc)


async def _nothing() -> AsyncIterator[StoredRecord]:
    return
    yield  # an async generator that yields nothing


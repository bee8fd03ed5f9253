"""FileStorage: one file per checkpoint in a directory, written atomically."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._errors import ConflictError, StorageError
from ._base import Checkpoint, Fence, Lease, SaveItem, StoredKey
from ._driver import (
    check_due,
    check_dues,
    check_fence,
    check_lease_args,
    check_limit,
    lease_lost,
    make_lease,
)

__all__ = ["FileStorage"]

_MAGIC = b"keyhive-file/1\n"  # then: base64(key) \n version \n data


class FileStorage:
    """Checkpoints as files under ``directory`` (``file:///path/to/dir``).

    Each storage key maps to ``<sha256 of key>.ckpt``, so no key (``../../x``, an
    absolute path, NUL bytes) can name a file outside the directory. A file holds the
    key, its version and the bytes. Writes go to a temp file that is fsynced and then
    renamed over the old one, so a crash leaves the old or the new checkpoint, never a
    torn one; an ``flock`` on the directory makes compare-and-set safe across processes.
    Blocking file calls run in worker threads, never on the event loop.

    Leases are JSON files in ``.leases/`` (named by the sha256 of the lease name), timed
    by this machine's clock. Due times are one small JSON index file, ``.due-index``. Every
    write (fenced or not), delete and lease change holds the exclusive ``flock`` on
    ``.lock`` across its checks and its writes, so a fence check and the write it guards
    are one step for every process. The index is written before the checkpoint: a crash
    in between leaves at most a due entry that fires spuriously (timers are at least
    once), never a lost one.
    """

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True) -> None:
        if not isinstance(directory, str | os.PathLike):
            raise TypeError(f"directory must be a path, not {type(directory).__name__}")
        self.directory = Path(directory)
        if str(self.directory) == "":
            raise ValueError("FileStorage needs a directory, e.g. FileStorage('./checkpoints')")
        if not isinstance(create, bool):
            raise TypeError(f"create must be True or False, not {create!r}")
        # create=False: use an existing directory only, never make one (read-only tools).
        self.create = create
        self._ready = False
        self._closed = False
        self._lock = asyncio.Lock()
        self._index: dict[str, float] = {}
        self._index_stamp: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"<FileStorage {str(self.directory)!r}>"

    def _path(self, key: str) -> Path:
        if type(key) is not str:
            raise TypeError(f"storage keys are str, not {type(key).__name__}")
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return self.directory / f"{digest}.ckpt"

    def _prepare(self) -> None:
        if self._closed:
            raise StorageError(f"{self!r} is closed")
        if not self._ready:
            if self.create:
                self.directory.mkdir(parents=True, exist_ok=True)
                if not os.access(self.directory, os.W_OK | os.X_OK):
                    raise PermissionError(f"directory {str(self.directory)!r} is not writable")
            elif not self.directory.is_dir():
                # Not mapped to StorageError here: the manager and the tools map OSErrors.
                raise FileNotFoundError(
                    f"no checkpoint directory {str(self.directory)!r} (nothing was created)")
            self._ready = True

    @staticmethod
    def _read(path: Path) -> tuple[str, int, bytes] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.startswith(_MAGIC):
            raise StorageError(f"{path} is not a keyhive checkpoint file")
        rest = raw[len(_MAGIC):]
        key_end = rest.index(b"\n")
        ver_end = rest.index(b"\n", key_end + 1)
        key = base64.b64decode(rest[:key_end]).decode("utf-8", "surrogatepass")
        return key, int(rest[key_end + 1:ver_end]), rest[ver_end + 1:]

    @staticmethod
    def _escape(key: str) -> bytes:
        return base64.b64encode(key.encode("utf-8", "surrogatepass"))

    def _load_sync(self, key: str) -> Checkpoint | None:
        self._prepare()
        entry = self._read(self._path(key))
        return None if entry is None else Checkpoint(entry[2], entry[1])

    # -- the lock, the fence, the due index --------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive ``flock`` on ``.lock`` (every writer in every process takes it)."""
        lock_fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)  # closing the descriptor releases the lock

    def _write_atomic(self, path: Path, blob: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _lease_path(self, name: str) -> Path:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        return self.directory / ".leases" / f"{digest}.lease"

    def _read_lease_record(self, name: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self._lease_path(name).read_bytes())
        except FileNotFoundError:
            return None
        return record

    def _check_fence(self, fence: Fence | None) -> None:
        """Raise LeaseLost unless ``fence`` names the stored epoch (call with the lock held)."""
        if fence is None:
            return
        record = self._read_lease_record(fence.name)
        if record is None or record["epoch"] != fence.epoch or record["released"]:
            stored = "no lease" if record is None else f"epoch {record['epoch']}"
            raise lease_lost(fence, stored)

    def _index_path(self) -> Path:
        return self.directory / ".due-index"

    def _read_index(self) -> dict[str, float]:
        """The due index, re-read only when the file changed (by inode, mtime and size)."""
        try:
            st = os.stat(self._index_path())
        except FileNotFoundError:
            self._index, self._index_stamp = {}, None
            return self._index
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._index_stamp:
            self._index = {k: float(v) for k, v in json.loads(self._index_path().read_bytes()).items()}
            self._index_stamp = stamp
        return self._index

    def _update_index(self, changes: dict[str, float | None]) -> None:
        """Apply ``changes`` (None removes) to the due index; write it only if it changed."""
        index = self._read_index()
        new = dict(index)
        for key, due in changes.items():
            if due is None:
                new.pop(key, None)
            else:
                new[key] = due
        if new == index:
            return
        self._write_atomic(self._index_path(), json.dumps(new).encode())
        self._index_stamp = None  # re-read (and re-stamp) on next use
        self._index = new

    # -- checkpoints -------------------------------------------------------------------------------

    def _write_checkpoint(self, path: Path, key: str, version: int, data: bytes) -> None:
        self._write_atomic(path, _MAGIC + self._escape(key) + b"\n" + str(version).encode() + b"\n" + data)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _plan(self, key: str, expected_version: int | None, versions: dict[str, int | None]) -> int:
        """The version a compare-and-set of ``key`` would write, or ConflictError (lock held)."""
        if key in versions:
            current = versions[key]
        else:
            entry = self._read(self._path(key))
            current = None if entry is None else entry[1]
        if current != expected_version:
            raise ConflictError(
                f"version conflict on {key!r}: expected {expected_version}, stored {current}"
            )
        return 1 if current is None else current + 1

    def _save_sync(self, key: str, data: bytes, expected_version: int | None,
                   fence: Fence | None = None, due: float | None = None) -> int:
        result = self._save_many_sync([SaveItem(key, data, expected_version)], fence, [due])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _save_many_sync(self, items: Sequence[SaveItem], fence: Fence | None,
                        dues: Sequence[float | None]) -> list[int | BaseException]:
        self._prepare()
        with self._locked():
            self._check_fence(fence)
            results: list[int | BaseException] = []
            versions: dict[str, int | None] = {}
            writes: list[tuple[Path, str, int, bytes]] = []
            changes: dict[str, float | None] = {}
            for item, due in zip(items, dues, strict=True):
                try:
                    path = self._path(item.key)
                    if not isinstance(item.data, bytes):
                        raise TypeError(f"checkpoint data must be bytes, not {type(item.data).__name__}")
                    version = self._plan(item.key, item.expected_version, versions)
                except (ConflictError, TypeError) as exc:
                    results.append(exc)
                    continue
                versions[item.key] = version
                writes.append((path, item.key, version, item.data))
                changes[item.key] = due
                results.append(version)
            if changes:
                self._update_index(changes)
            for path, key, version, data in writes:
                self._write_checkpoint(path, key, version, data)
            return results

    def _delete_sync(self, key: str, version: int | None = None, fence: Fence | None = None) -> bool:
        self._prepare()
        path = self._path(key)
        with self._locked():
            self._check_fence(fence)
            if version is not None:
                entry = self._read(path)
                if entry is None or entry[1] != version:
                    return False
            self._update_index({key: None})
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            return True

    def _due_sync(self, prefix: str, until: float, limit: int) -> list[tuple[str, float]]:
        self._prepare()
        due = sorted((d, k) for k, d in self._read_index().items() if d <= until and k.startswith(prefix))
        return [(k, d) for d, k in due[:limit]]

    def _stale_sync(self, prefix: str, older_than: float, limit: int) -> list[StoredKey]:
        self._prepare()
        # stat first, read only the old enough: the checkpoint files hold the keys.
        old: list[tuple[float, Path]] = []
        for path in self.directory.glob("*.ckpt"):
            with contextlib.suppress(FileNotFoundError):
                mtime = path.stat().st_mtime
                if mtime < older_than:
                    old.append((mtime, path))
        found: list[StoredKey] = []
        for mtime, path in sorted(old):
            entry = self._read(path)
            if entry is not None and entry[0].startswith(prefix):
                found.append(StoredKey(entry[0], entry[1], len(entry[2]), mtime))
                if len(found) == limit:
                    break
        return found

    # -- leases (this machine's clock) ---------------------------------------------------------------

    def _acquire_sync(self, name: str, holder: str, ttl: float, takeover: bool) -> Lease:
        self._prepare()
        (self.directory / ".leases").mkdir(exist_ok=True)
        with self._locked():
            now = time.time()
            record = self._read_lease_record(name)
            if record is None:
                record = {"name": name, "holder": holder, "epoch": 1, "acquired_at": now,
                          "expires_at": now + ttl, "released": False}
            elif record["holder"] == holder and not record["released"]:  # renewal keeps the epoch
                record["expires_at"] = now + ttl
            elif record["released"] or record["expires_at"] <= now or takeover:
                record = {"name": name, "holder": holder, "epoch": record["epoch"] + 1,
                          "acquired_at": now, "expires_at": now + ttl, "released": False}
            else:
                return self._lease(record, now)
            self._write_atomic(self._lease_path(name), json.dumps(record).encode())
            return self._lease(record, now)

    def _release_sync(self, name: str, holder: str, epoch: int) -> bool:
        self._prepare()
        with self._locked():
            record = self._read_lease_record(name)
            if (record is None or record["holder"] != holder or record["epoch"] != epoch
                    or record["released"]):
                return False
            record["released"], record["expires_at"] = True, time.time()
            self._write_atomic(self._lease_path(name), json.dumps(record).encode())
            return True

    @staticmethod
    def _lease(record: dict[str, Any], now: float) -> Lease:
        return make_lease(record["name"], record["holder"], record["epoch"], record["acquired_at"],
                          record["expires_at"], record["released"], now)

    def _header(self, entry: os.DirEntry[str]) -> StoredKey | None:
        """What a checkpoint file says about itself, from its first bytes and its size."""
        try:
            with open(entry.path, "rb") as f:
                # The header: the storage key (manager, partition and key, each at most about
                # 1 KiB encoded) in base64 and the version; 64 KiB holds it with room to spare.
                head = f.read(65536)
                stat = os.fstat(f.fileno())
        except FileNotFoundError:
            return None  # deleted while we listed
        if not head.startswith(_MAGIC):
            raise StorageError(f"{entry.path} is not a keyhive checkpoint file")
        rest = head[len(_MAGIC):]
        key_end = rest.find(b"\n")
        ver_end = rest.find(b"\n", key_end + 1)
        if key_end < 0 or ver_end < 0:
            raise StorageError(f"{entry.path} has no complete keyhive checkpoint header")
        key = base64.b64decode(rest[:key_end]).decode("utf-8", "surrogatepass")
        size = stat.st_size - len(_MAGIC) - ver_end - 1
        return StoredKey(key, int(rest[key_end + 1:ver_end]), size, stat.st_mtime)

    def _scan_sync(self, prefix: str) -> Generator[StoredKey, None, None]:
        """Every checkpoint under ``prefix``, read lazily with ``os.scandir`` (headers only)."""
        self._prepare()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(".ckpt"):
                    continue
                item = self._header(entry)
                if item is not None and item.key.startswith(prefix):
                    yield item

    async def load(self, key: str) -> Checkpoint | None:
        return await asyncio.to_thread(self._load_sync, key)

    async def save(self, key: str, data: bytes, *, expected_version: int | None,
                   fence: Fence | None = None, due: float | None = None) -> int:
        """Compare-and-set one checkpoint with its due time, under ``fence`` when given."""
        if not isinstance(data, bytes):
            raise TypeError(f"checkpoint data must be bytes, not {type(data).__name__}")
        fence = check_fence(fence)
        due = check_due(due)
        async with self._lock:
            return await asyncio.to_thread(self._save_sync, key, data, expected_version, fence, due)

    async def save_many(self, items: Sequence[SaveItem], *, fence: Fence | None = None,
                        due: Sequence[float | None] | None = None) -> list[int | BaseException]:
        """Each item's compare-and-set in turn, in one worker-thread hop under one lock.

        With ``fence``, all of the batch or (LeaseLost) none of it.
        """
        items = list(items)
        fence = check_fence(fence)
        dues = check_dues(due, len(items))
        async with self._lock:
            return await asyncio.to_thread(self._save_many_sync, items, fence, dues)

    async def delete(self, key: str, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` and its due time; ``True`` when something was removed."""
        fence = check_fence(fence)
        async with self._lock:
            return await asyncio.to_thread(self._delete_sync, key, None, fence)

    async def delete_if(self, key: str, version: int, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` only while its stored version is ``version``; ``True`` when removed."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, not {type(version).__name__}")
        fence = check_fence(fence)
        async with self._lock:
            return await asyncio.to_thread(self._delete_sync, key, version, fence)

    async def due_keys(self, prefix: str, until: float, limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, due)`` with ``prefix`` and ``due <= until``, earliest first."""
        limit = check_limit(limit)
        return await asyncio.to_thread(self._due_sync, prefix, float(until), limit)

    async def stale_keys(self, prefix: str, older_than: float, limit: int = 1000) -> list[StoredKey]:
        """Up to ``limit`` checkpoints with ``prefix`` last written before ``older_than``, oldest first.

        File times are the checkpoint files' mtimes; the directory is listed (stat only)
        and only the old enough files are read.
        """
        limit = check_limit(limit)
        return await asyncio.to_thread(self._stale_sync, prefix, float(older_than), limit)

    async def acquire_lease(self, name: str, holder: str, ttl: float, *,
                            takeover: bool = False) -> Lease:
        """Take or renew ``name`` for ``ttl`` seconds (this machine's clock); see LeaseStorage."""
        ttl = check_lease_args(name, holder, ttl)
        return await asyncio.to_thread(self._acquire_sync, name, holder, ttl, bool(takeover))

    async def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        """Give ``name`` up at once, keeping its epoch; False when it is not ours anymore."""
        check_lease_args(name, holder)
        return await asyncio.to_thread(self._release_sync, name, holder, epoch)

    async def read_lease(self, name: str) -> Lease | None:
        """The lease ``name`` as stored, or None when nobody ever took it."""
        check_lease_args(name, "reader")

        def read() -> Lease | None:
            self._prepare()
            record = self._read_lease_record(name)
            return None if record is None else self._lease(record, time.time())

        return await asyncio.to_thread(read)

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[StoredKey]:
        """Every key under ``prefix``, in no order: 1,000 files per worker-thread hop."""
        scan = self._scan_sync(prefix)

        def page() -> list[StoredKey]:
            return list(itertools.islice(scan, 1000))

        try:
            while True:
                items = await asyncio.to_thread(page)
                for item in items:
                    yield item
                if len(items) < 1000:
                    return
        finally:
            # Closes the scandir handle now. ValueError: a cancelled hop's thread is still
            # inside the generator; it then closes when the generator is collected.
            with contextlib.suppress(ValueError):
                scan.close()

    async def ping(self) -> None:
        """Check the directory exists (made unless ``create=False``) and is writable.

        Raises:
            StorageError: it is missing, not a directory or not writable; the message names
                the path, the OS error is ``__cause__``.
        """
        def check() -> None:
            self._prepare()
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(f"directory {str(self.directory)!r} is not writable")

        try:
            await asyncio.to_thread(check)
        except OSError as exc:
            raise StorageError(
                f"file storage {str(self.directory)!r} is not usable: {exc}; check that the path "
                "is right and that this user may create and write files in it"
            ) from exc

    async def aclose(self) -> None:
        self._closed = True


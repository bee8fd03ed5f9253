"""FileStorage: one file per checkpoint in a directory, written atomically."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Generator, Sequence
from pathlib import Path

from .._errors import ConflictError, StorageError
from ._base import Checkpoint, SaveItem, StoredKey

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

    def _save_sync(self, key: str, data: bytes, expected_version: int | None) -> int:
        self._prepare()
        path = self._path(key)
        lock_fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            entry = self._read(path)
            current = None if entry is None else entry[1]
            if current != expected_version:
                raise ConflictError(
                    f"version conflict on {key!r}: expected {expected_version}, stored {current}"
                )
            version = 1 if current is None else current + 1
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".ckpt")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_MAGIC + self._escape(key) + b"\n" + str(version).encode() + b"\n")
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return version
        finally:
            os.close(lock_fd)

    def _delete_sync(self, key: str) -> bool:
        self._prepare()
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return False
        return True

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

    async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
        if not isinstance(data, bytes):
            raise TypeError(f"checkpoint data must be bytes, not {type(data).__name__}")
        async with self._lock:
            return await asyncio.to_thread(self._save_sync, key, data, expected_version)

    async def save_many(self, items: Sequence[SaveItem]) -> list[int | BaseException]:
        """Each item's compare-and-set in turn, in one worker-thread hop."""
        items = list(items)

        def write() -> list[int | BaseException]:
            results: list[int | BaseException] = []
            for item in items:
                try:
                    results.append(self._save_sync(item.key, item.data, item.expected_version))
                except (ConflictError, TypeError) as exc:
                    results.append(exc)
            return results

        async with self._lock:
            return await asyncio.to_thread(write)

    async def delete(self, key: str) -> bool:
        async with self._lock:
            return await asyncio.to_thread(self._delete_sync, key)

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


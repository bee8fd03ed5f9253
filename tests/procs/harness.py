"""Drive child processes line by line, and name one shared storage per backend.

A :class:`Child` is a real process (``python -m tests.procs.<module>``) whose stdout is
read by a background task into :attr:`Child.lines`, so that a test can wait for a line,
SIGKILL or SIGSTOP the child at any moment, and still read every line it had printed.
Its stderr goes to a file, shown when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

__all__ = ["REPO", "Child", "child_env", "items_of", "shared_url"]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the worktree's ``src`` and root first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    env.update(extra)
    return env


def shared_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A storage URL of backend ``kind`` that child processes and this test all open."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    if kind == "file":
        return f"file://{tmp_path}/shared-dir"
    if kind == "redis":
        return request.getfixturevalue("redis_server").url + f"?key_prefix=procs-{uuid.uuid4().hex}:"
    if kind == "postgres":
        return request.getfixturevalue("postgres_server").url + f"?table=procs_{uuid.uuid4().hex}"
    raise AssertionError(kind)


class Child:
    """One child process, its stdout lines as they come, its stderr in a log file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def spawn(cls, module: str, *args: str, log: Path, env: dict[str, str] | None = None) -> Child:
        """Start ``python -m tests.procs.<module> *args``."""
        with open(log, "ab") as err:  # noqa: ASYNC230  # a local log file, opened once per child
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"tests.procs.{module}", *args, cwd=REPO, env=env or child_env(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err)
        return cls(proc, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode().rstrip("\n"))
            self._new.set()
        self._new.set()

    async def expect(self, prefix: str | tuple[str, ...], *, after: int = 0, timeout: float = 30.0) -> str:
        """The first line from index ``after`` on that starts with ``prefix`` (waiting for it)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.lines[after:]:
                        if line.startswith(prefix):
                            return line
                    if self._reader.done():
                        raise AssertionError(f"child exited without printing {prefix!r}")
                    self._new.clear()
                    await self._new.wait()
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc or 'timeout'}: waiting for {prefix!r}; the child printed "
                                 f"{self.lines[after:][-20:]}; stderr:\n{self.stderr()}") from None

    def send(self, line: str) -> None:
        """Write one command line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def kill(self) -> list[str]:
        """SIGKILL, wait, and return every line it printed."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        return await self.finished()

    async def finished(self, timeout: float = 30.0) -> list[str]:
        """Wait for the child to exit (and its stdout to end); every line it printed."""
        async with asyncio.timeout(timeout):
            await self.proc.wait()
            await self._reader
        return self.lines

    async def reap(self) -> None:
        """Make sure it is gone (for ``finally:``), also when it was SIGSTOPped."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            await self.finished(10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def stderr(self) -> str:
        try:
            return self.log.read_text()[-4000:]
        except OSError:
            return ""


async def items_of(url: str, name: str, key: str = "k", **options: Any) -> list[Any]:
    """The list state of ``key`` as a restarted manager thaws it (taking the lease over at
    once: the caller knows its previous holder is dead), then closed again."""
    import keyhive

    from .child import Log

    async with keyhive.InstanceManager(name, Log, storage=url, _takeover=True, **options) as m:
        items: list[Any] = await m.call(key, "items")
        return items

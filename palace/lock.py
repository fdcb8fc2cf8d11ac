"""The palace writer lock, shared with MemPalace.

Same file and semantics as MemPalace 3.11's ``mine_palace_lock``:
``~/.mempalace/locks/mine_palace_<sha256(normcase(realpath(palace)))[:16]>.lock``,
an exclusive ``flock``, the holder's ``"<pid> <argv[:3]>"`` written from byte 1.
So ``mempalace mine`` and MemPalace's MCP writers never write beside us, and we
never write beside them. MemPalace's lock is non-blocking; ours waits up to a
timeout, then raises ``PalaceLocked`` naming the holder.

Re-entrant within a process. The OS drops a flock when its process dies, so a
SIGKILL never leaves a stale lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import PalaceEtlError, PalaceLocked

_held: dict[str, int] = {}
_guard = threading.RLock()
# Test-only switch: proves the concurrency tests can fail. Never set it in real use.
UNSAFE_NO_LOCK_ENV = "PALACE_ETL_UNSAFE_NO_LOCK"


def palace_digest(palace: str | os.PathLike) -> str:
    """sha256 of the palace's canonical path, as MemPalace keys its lock, hub and daemon files by it
    (the lock takes 16 hex digits of it, the hub and daemon directories 24)."""
    resolved = os.path.normcase(os.path.realpath(os.path.expanduser(str(palace))))
    return hashlib.sha256(resolved.encode("utf-8")).hexdigest()


def lock_path(palace: str | os.PathLike) -> Path:
    return Path.home() / ".mempalace" / "locks" / f"mine_palace_{palace_digest(palace)[:16]}.lock"


# argv fragments of MemPalace processes that hold the lease for their whole life: the hub and
# ``python -m mempalace.mcp_server`` (``.../mcp_server/__main__.py``), the stdio ``mempalace-mcp``,
# the daemon (``.../mempalace/daemon.py serve``)
_SERVERS = ("mcp_server", "mempalace-mcp", "mempalace/daemon.py")


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a palace lock, as its file says: ``<pid> <argv>`` written from byte 1."""

    pid: int | None
    argv: str

    @classmethod
    def read(cls, f) -> "LeaseHolder":
        try:
            f.seek(1)
            pid, _, argv = f.read(4096).decode("utf-8", "replace").strip().partition(" ")
        except OSError:
            pid, argv = "", ""
        return cls(int(pid), argv.strip()) if pid.isdigit() else cls(None, "")

    @property
    def is_server(self) -> bool:
        """A MemPalace server (stdio MCP, hub, daemon): it keeps the lease until it exits."""
        return any(s in self.argv for s in _SERVERS)

    def __str__(self) -> str:
        if self.pid is None:
            return "another writer (identity not recorded)"
        return f"PID {self.pid} ({self.argv})" if self.argv else f"PID {self.pid}"


def _flock(fd, exclusive: bool, timeout: float, poll: float = 0.05) -> bool:
    """The one flock loop: take the lock on ``fd`` (exclusive or shared), trying until ``timeout``
    seconds have passed (0: once); False when it stayed held by someone else."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, op)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)


@contextlib.contextmanager
def palace_lock(palace: str | os.PathLike, timeout: float = 5.0, poll: float = 0.05) -> Iterator[None]:
    """Hold the palace writer lock; wait up to ``timeout`` seconds for it."""
    if os.environ.get(UNSAFE_NO_LOCK_ENV) == "1":
        yield
        return
    path = lock_path(palace)
    key = str(path)
    with _guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    f = os.fdopen(fd, "r+b")
    try:
        if not _flock(f, True, timeout, poll):
            raise PalaceLocked(f"lock palace {palace}: held by {LeaseHolder.read(f)} (waited {timeout:g}s)",
                               hint="wait for it to finish, stop it, or raise --lock-timeout")
        ident = f"{os.getpid()} {' '.join(sys.argv[:3])}".strip().encode()
        f.seek(1)
        f.truncate(1 + len(ident))
        f.write(ident)
        f.flush()
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                del _held[key]
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


def session_lock_path(palace: str | os.PathLike) -> Path:
    """palace-etl's own run lock, beside MemPalace's (in ``~/.mempalace/locks``, never in the palace)."""
    mine = lock_path(palace)
    return mine.with_name(mine.name.replace("mine_palace_", "palace_etl_session_", 1))


@contextlib.contextmanager
def session_lock(palace: str | os.PathLike, exclusive: bool, timeout: float = 5.0,
                 poll: float = 0.05) -> Iterator[None]:
    """An import holds this shared for its whole run; a restore holds it exclusively while it
    replaces the palace. The palace writer lock alone is taken per write, so without this a restore
    could swap the palace between two batches of an import and split its drawers across two
    directories."""
    path = session_lock_path(palace)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        if not _flock(fd, exclusive, timeout, poll):
            what = "an import is running on it" if exclusive else "a restore is replacing it"
            raise PalaceLocked(f"lock palace {palace}: {what} (waited {timeout:g}s)",
                               hint="wait for it to finish, or raise --lock-timeout")
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def dir_lock(path: Path, what: str) -> Iterator[None]:
    """A non-blocking "already running" lock on ``path`` (a backup directory's ``.export.lock``):
    a second holder fails at once with ``PalaceLocked`` naming the first."""
    try:  # never through a symlink: a planted link would have us truncate its target
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise PalaceEtlError(f"{what}: cannot use {Path(path).name} ({exc.strerror}; a symlink there is refused)") \
            from None
    with os.fdopen(fd, "r+") as f:
        if not _flock(f, True, 0):
            holder = f.read().strip() or "another export"
            raise PalaceLocked(f"{what}: already running ({holder})", hint="overlapping cron runs: let the first finish")
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

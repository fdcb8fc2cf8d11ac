"""Private scratch directories in the system temp directory: a palace's private copy, a decrypted
bundle, a database rolled back from its journal. A run removes its own when it ends; a run killed
with SIGKILL (the OOM killer, ``timeout -s KILL``) cannot, and a copy of a large palace left in /tmp
every such night fills the disk. So each scratch directory holds an owner file, flocked for the
directory's whole life, and every new one first removes those whose owner is gone: the OS drops a
flock when its process dies, however it dies.

Removed only when all of these hold: the name starts with one of ``PREFIXES``; it is a real
directory (not a symlink) owned by this user; its owner file is a regular file (opened without
following a symlink) whose lock is free. A directory without an owner file (made by an older
palace-etl, or by someone else) is left alone.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .lock import _flock

SNAPSHOT, JOURNAL, DECRYPTED = "palace-etl-snapshot-", "palace-etl-journal-", "palace-etl-decrypted-"
PREFIXES = (SNAPSHOT, JOURNAL, DECRYPTED)
OWNER = ".palace-etl-owner"

_held: dict[str, int] = {}  # scratch directory -> the fd holding its owner file's flock
_guard = threading.Lock()


def make(prefix: str) -> Path:
    """A new private (0700) scratch directory in the temp directory, held until ``remove``; stale
    ones of killed runs are removed first."""
    assert prefix in PREFIXES, prefix
    sweep()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        # locked before it gets its name, so a sweep never finds the owner file unlocked
        fd = os.open(tmp / f"{OWNER}.new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.rename(tmp / f"{OWNER}.new", tmp / OWNER)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _guard:
        _held[str(tmp)] = fd
    return tmp


def remove(path: Path) -> None:
    """Remove a scratch directory of this process and release its lock (a second call does nothing)."""
    shutil.rmtree(path, ignore_errors=True)
    with _guard:
        fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    path = make(prefix)
    try:
        yield path
    finally:
        remove(path)


def sweep() -> None:
    """Remove the scratch directories of runs that are gone (see the module's rules)."""
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PREFIXES) or entry.path in _held:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            # O_NONBLOCK: a FIFO planted under that name must not hang the run
            fd = os.open(os.path.join(entry.path, OWNER), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # no owner file: not ours to judge
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and _flock(fd, True, 0):  # free: its run is gone
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass  # a lock this filesystem will not take: leave it
        finally:
            os.close(fd)

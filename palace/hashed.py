"""What this machine has already hashed, so a nightly export does not re-read the whole chain it
extends: a file's sha256 is kept with the file's identity (device, inode, size, modification and
change times) when it was read. A file whose identity is unchanged is not read again; any write to
it, a copy put in its place, or a ``touch`` changes its change time, which no user can set back. A
file is read again at least every ``MAX_AGE`` all the same, so what rots under an unchanged identity
is found within a week even where nothing else reads it. Only export uses this, for the chain it
extends and the bundle it has just written; ``verify``, ``restore`` and ``sync`` always re-read
every byte (bit rot changes no time, and a restore is the moment that must not trust). A same-size
write within the file system's timestamp tick of this machine's read would go unseen, as it would by
``git``'s index. ``drop`` (verify, on finding damage) wins over an export running at the time: that
export saves nothing over a record changed since it loaded it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Iterator

import orjson

from .layout import atomic_write

MAX_AGE = 7 * 86400  # seconds a remembered sha256 is trusted before the file is read again


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _version(st: os.stat_result | None) -> list[int] | None:
    """Which writing of the record file this is (each save and each drop makes a new file)."""
    return None if st is None else [st.st_dev, st.st_ino, *_identity(st)]


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """The record's own lock, held only while it is compared and replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _current(path: Path) -> list[int] | None:
    try:
        return _version(path.stat())
    except FileNotFoundError:
        return None


class HashRecord:
    """sha256s of files by identity, loaded from and saved to ``path`` (a JSON file this machine
    owns). An entry is [size, mtime_ns, ctime_ns, sha256, the time it was read]."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._known: dict[str, list] = {}
        self._used: dict[str, list] = {}
        self._loaded: list[int] | None = None  # the version of the record read, compared on save
        try:
            with open(self.path, "rb") as f:
                self._loaded = _version(os.fstat(f.fileno()))
                known = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            known = {}  # no record, or a damaged one: everything is read again
        if isinstance(known, dict):
            self._known = {k: v for k, v in known.items()
                           if isinstance(v, list) and len(v) == 5 and isinstance(v[3], str)
                           and isinstance(v[4], (int, float))}

    def sha256(self, file: Path, expect: str) -> str:
        """The sha256 of ``file``'s bytes: ``expect`` when this machine hashed it to that within
        ``MAX_AGE`` and its identity is what it was then, else read (and remembered when the file
        did not change while it was read). A remembered sha256 other than ``expect`` is never
        reported: the file is read."""
        with open(file, "rb") as f:
            before = os.fstat(f.fileno())
            key = f"{before.st_dev}:{before.st_ino}"
            entry = self._known.get(key)
            if entry is not None and entry[:3] == _identity(before) and entry[3] == expect and \
                    time.time() - entry[4] < MAX_AGE:
                self._used[key] = entry
                return entry[3]
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            if _identity(os.fstat(f.fileno())) == _identity(before):
                self._used[key] = [*_identity(before), digest, time.time()]
            return digest

    def save(self) -> None:
        """Keep what this run hashed or relied on (the rest no longer matters: bundles removed or
        replaced), unless the record was dropped or rewritten since it was loaded: then that stands,
        and the next run reads again. A record that cannot be written only costs the next run a
        re-read."""
        try:
            with _held(self.path):
                if _current(self.path) == self._loaded:
                    atomic_write(self.path, orjson.dumps(self._used))
        except OSError:
            pass

    @staticmethod
    def drop(path: Path) -> bool:
        """Forget every sha256 in the record at ``path`` (True when it held any), so the next run
        reads every file again; a run that loaded the record before is kept from saving it back."""
        path = Path(path)
        with _held(path):
            try:
                held = bool(orjson.loads(path.read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                held = False
            atomic_write(path, b"{}")  # a new file, not a removal: a run that loaded none sees it too
        return held

"""The run ledger.

The ledger (``<state_dir>/ledger.sqlite3``) records every import run and each
batch it committed, so an interrupted run is visibly incomplete and a re-run of
the same source resumes after the last committed batch. The run id is derived
from the importer, the source path and fingerprint and the options: the same
import of an unchanged source is the same run. A complete run supersedes the
unfinished runs of the same import over the source's earlier content.

Records an importer could not parse go to the quarantine (``importers.quarantine``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import orjson

from palace.chroma_sqlite import ro_uri, unsettled
from palace.errors import PalaceLocked
from palace.layout import open_private, private_dir

_LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, importer TEXT NOT NULL, source TEXT NOT NULL, fingerprint TEXT NOT NULL,
    options TEXT NOT NULL, status TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, report TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, rows INTEGER NOT NULL,
    written INTEGER NOT NULL, committed_at REAL NOT NULL, PRIMARY KEY (run_id, seq)
);
"""

DONE = ("complete", "superseded")  # run statuses nothing is left to do for
SETTLE_TRIES = 4  # waits for a source written within the clock's tick (each at most a tick)


def source_fingerprint(path: Path) -> str:
    """Size and mtime of a file, or of every file under a directory (cheap, no content read), taken
    once the files have settled: a file written within the clock's tick could be written again with
    the same stamp (``unsettled``), and a re-run would then resume this run over other content. A
    source that never settles (still being written) gets a fingerprint of its own: no re-run resumes it."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for _ in range(SETTLE_TRIES):
        stats = [(p, p.stat()) for p in files]
        wait = unsettled(st.st_mtime_ns for _, st in stats)
        if not wait:
            break
        time.sleep(wait)
    h = hashlib.sha256(os.urandom(16) if wait else b"")
    for p, st in stats:
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def make_run_id(importer: str, source: Path, fingerprint: str, options: dict) -> str:
    key = orjson.dumps([importer, str(Path(source).resolve()), fingerprint, options], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(key).hexdigest()[:16]


class Ledger:
    def __init__(self, state_dir: Path, read_only: bool = False):
        """The ledger of ``state_dir``; ``read_only`` (for status and verify) opens an existing one
        without creating, migrating or re-stamping anything."""
        self.path = state_dir / "ledger.sqlite3"
        if read_only:
            self._conn = sqlite3.connect(ro_uri(self.path), uri=True, timeout=60, isolation_level=None)
            return
        private_dir(state_dir)
        open_private(self.path).close()  # 0600 and not a symlink; SQLite gives its -wal/-shm the same mode
        self._conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None,
                                     check_same_thread=False)  # the loader commits from its writer thread
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_LEDGER_SQL)
        if "sample" not in {r[1] for r in self._conn.execute("PRAGMA table_info(batches)")}:  # a ledger of before
            self._conn.execute("ALTER TABLE batches ADD COLUMN sample TEXT")

    @classmethod
    @contextlib.contextmanager
    def reading(cls, state_dir: Path | None) -> Iterator["Ledger | None"]:
        """The ledger opened read-only, or None when there is none."""
        if state_dir is None or not (state_dir / "ledger.sqlite3").is_file():
            yield None
            return
        ledger = cls(state_dir, read_only=True)
        try:
            yield ledger
        finally:
            ledger.close()

    def start(self, run_id: str, importer: str, source: Path, fingerprint: str, options: dict) -> int:
        """Begin (or resume) a run; return the last committed batch seq (-1 for none)."""
        row = self._conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            self._conn.execute("INSERT INTO runs VALUES (?,?,?,?,?,'running',?,NULL,NULL)",
                               (run_id, importer, str(source), fingerprint,
                                orjson.dumps(options, option=orjson.OPT_SORT_KEYS).decode(), time.time()))
            return -1
        if row[0] == "complete":
            # a finished run of an unchanged source: re-check everything (cheap, writes nothing)
            self._conn.execute("DELETE FROM batches WHERE run_id=?", (run_id,))
        self._conn.execute("UPDATE runs SET status='running', finished_at=NULL WHERE run_id=?", (run_id,))
        (last,) = self._conn.execute("SELECT coalesce(max(seq), -1) FROM batches WHERE run_id=?",
                                     (run_id,)).fetchone()
        return int(last)

    def committed(self, run_id: str, seq: int, kind: str, rows: int, written: int, sample: list[str] = ()) -> None:
        """Record a committed batch, with ``sample``: ids the palace holds once it is written (``held``)."""
        self._conn.execute("INSERT OR REPLACE INTO batches (run_id, seq, kind, rows, written, committed_at, sample) "
                           "VALUES (?,?,?,?,?,?,?)", (run_id, seq, kind, rows, written, time.time(),
                                                      orjson.dumps(list(sample)).decode() if sample else None))

    def held(self, run_id: str, kind: str) -> list[str]:
        """The sample ids of the run's committed batches of ``kind``: what a resume may check is still there."""
        out: list[str] = []
        for (sample,) in self._conn.execute("SELECT sample FROM batches WHERE run_id=? AND kind=? AND sample IS NOT "
                                            "NULL ORDER BY seq", (run_id, kind)):
            out += orjson.loads(sample)
        return out

    def restart(self, run_id: str) -> None:
        """Forget the run's committed batches: the next pass reads the source from the start."""
        self._conn.execute("DELETE FROM batches WHERE run_id=?", (run_id,))

    def finish(self, run_id: str, status: str, report: dict) -> None:
        """End a run. A complete one supersedes the unfinished runs of the same import (importer,
        source and options) over other content: it read the source as it now is, whole."""
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("UPDATE runs SET status=?, finished_at=?, report=? WHERE run_id=?",
                               (status, time.time(), orjson.dumps(report).decode(), run_id))
            if status == "complete":
                self._conn.execute(
                    "UPDATE runs SET status='superseded' WHERE status NOT IN (?, ?) AND run_id != ? AND "
                    "(importer, source, options) = (SELECT importer, source, options FROM runs WHERE run_id = ?)",
                    (*DONE, run_id, run_id))

    def options_for(self, importer: str, source: Path) -> dict | None:
        """The options of the newest run of ``importer`` over ``source`` (what verify re-reads it with)."""
        row = self._conn.execute("SELECT options FROM runs WHERE importer = ? AND source = ? ORDER BY started_at "
                                 "DESC LIMIT 1", (importer, str(Path(source).resolve()))).fetchone()
        return orjson.loads(row[0]) if row else None

    def runs(self) -> list[dict]:
        cur = self._conn.execute("SELECT run_id, importer, source, status, started_at, finished_at FROM runs "
                                 "ORDER BY started_at")
        return [dict(zip(("run_id", "importer", "source", "status", "started_at", "finished_at"), r)) for r in cur]

    def forget(self, forgotten: dict[str, set[str]]) -> int:
        """Take the ids whose ``id_key`` is in ``forgotten`` ({table: hashes}) out of every batch's
        sample, leaving no copy of them in the file: overwritten in place (``secure_delete``), then
        the WAL emptied. Returns how many samples changed."""
        # imported here: every CLI start imports this module, and palace.rows loads pyarrow
        from palace.rows import id_key

        self._conn.execute("PRAGMA secure_delete=ON")
        changed = []
        for rowid, kind, sample in self._conn.execute(
                "SELECT rowid, kind, sample FROM batches WHERE sample IS NOT NULL").fetchall():
            ids, gone = orjson.loads(sample), forgotten.get(kind) or ()
            kept = [i for i in ids if id_key(i) not in gone]
            if len(kept) < len(ids):
                changed.append((orjson.dumps(kept).decode() if kept else None, rowid))
        if changed:
            self._conn.executemany("UPDATE batches SET sample=? WHERE rowid=?", changed)
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                raise PalaceLocked(f"forget in {self.path}: another process reads the run ledger; its write-ahead "
                                   "log still holds the forgotten ids", hint="run the same command again once "
                                   "no import runs on this palace")
        return len(changed)

    def close(self) -> None:
        self._conn.close()


def forget_in_ledger(state_dir: Path | None, forgotten: dict[str, set[str]]) -> list[str]:
    """``Ledger.forget`` on the ledger of ``state_dir``, if it has one; what was done, for a receipt."""
    if state_dir is None or not (state_dir / "ledger.sqlite3").is_file():
        return []
    ledger = Ledger(state_dir)
    try:
        n = ledger.forget(forgotten)
    finally:
        ledger.close()
    return [f"{ledger.path}: the ids dropped from {n} resume samples, overwritten"] if n else []

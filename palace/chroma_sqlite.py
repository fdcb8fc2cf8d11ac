"""Read-only access to a palace's ``chroma.sqlite3`` without a Chroma client.

Opening a Chroma client is a write (backfill + log purge), so status and
verification read Chroma's SQLite tables directly, read-only, as MemPalace
3.11's ``status`` does. Never keep one of these connections open while this
process also has a Chroma client on the same palace: POSIX locks are per
process, and closing this connection would drop Chroma's.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

from . import scratch
from .errors import PalaceLocked, SourceMissing
from .layout import CHROMA_DB, DRAWERS_COLLECTION


def ro_uri(db: Path) -> str:
    """A read-only SQLite URI for ``db``: the path is percent-quoted, so ``#`` or ``?`` in it never
    end the path (``p#x/chroma.sqlite3`` would otherwise open, or create, ``p``)."""
    return f"file:{quote(str(Path(db).resolve()))}?mode=ro"


def hot_journal(db: Path) -> bool:
    """A rollback journal left by a writer killed mid-transaction: a read-only connection cannot
    roll it back, so every read fails ("attempt to write a readonly database") until a read-write
    open does. The data is intact; nothing is corrupt."""
    journal = Path(f"{db}-journal")
    return journal.is_file() and journal.stat().st_size > 0


def journal_is_hot(db: Path) -> bool:
    """Whether ``db`` has a hot journal now: a journal file, and a read-only connection that cannot
    read past it (a live writer mid-transaction holds RESERVED, so its journal is not hot and reads
    go on). Writes nothing."""
    if not hot_journal(db):
        return False
    conn = sqlite3.connect(ro_uri(db), uri=True, timeout=1.0)
    try:
        _readable(conn)
    except sqlite3.OperationalError as exc:
        return _stopped_by_journal(exc, db)
    finally:
        conn.close()
    return False


def _stopped_by_journal(exc: sqlite3.OperationalError, db: Path) -> bool:
    """A read-only read that failed because a hot journal needs rolling back first."""
    return "readonly" in str(exc) and hot_journal(db)


def recover_hot_journal(db: Path) -> bool:
    """Roll a hot journal back the way SQLite intends: one read-write open, under the palace writer
    lock so no writer of ours or MemPalace's is mid-way. False when another process holds that lock
    (then read a private copy instead, see ``open_ro``)."""
    from .lock import palace_lock

    try:
        with palace_lock(Path(db).parent, timeout=0):
            roll_back_journal(db)
    except PalaceLocked:
        return False
    return True


def roll_back_journal(db: Path) -> None:
    """One read-write open and read of ``db``: SQLite rolls a hot journal back there, and only a hot
    one (it takes the file's EXCLUSIVE lock first, and a journal whose writer is alive holds RESERVED,
    so is never hot). Safe beside any SQLite process; the caller makes sure no Chroma client of this
    process has the file open (POSIX locks are per process)."""
    rw = sqlite3.connect(str(db), timeout=30)
    try:
        _readable(rw)
    finally:
        rw.close()


def _readable(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()


def begin_read(conn: sqlite3.Connection) -> None:
    """Open a read transaction and take its SHARED lock now (a rollback-journal database: no writer
    commits until the transaction ends)."""
    conn.execute("BEGIN")
    _readable(conn)


@contextlib.contextmanager
def open_ro(db: Path, timeout: float = 30.0) -> Iterator[sqlite3.Connection]:
    """A read-only connection. A hot journal from a killed writer is rolled back (under the palace
    lock, when free) or, while another process holds the lock, read around: the database and its
    journal are copied to a private directory and the copy is rolled back and read."""
    if not Path(db).exists():
        raise SourceMissing(f"read {db}: no such file", hint="is this a palace directory?")
    conn = sqlite3.connect(ro_uri(db), uri=True, timeout=timeout)
    private = None
    try:
        try:
            _readable(conn)
        except sqlite3.OperationalError as exc:
            if not _stopped_by_journal(exc, db):
                raise
            conn.close()
            if recover_hot_journal(db):
                conn = sqlite3.connect(ro_uri(db), uri=True, timeout=timeout)
            else:
                private = scratch.make(scratch.JOURNAL)
                shutil.copy2(db, private / Path(db).name)
                shutil.copy2(f"{db}-journal", private / f"{Path(db).name}-journal")
                conn = sqlite3.connect(str(private / Path(db).name), timeout=timeout)
                _readable(conn)  # rolls the copy back
        yield conn
    finally:
        conn.close()
        if private is not None:
            scratch.remove(private)


def copy_db(db: Path, dest: Path) -> None:
    """A consistent copy of ``db`` at ``dest``, taken beside live writers without their lock. In a
    rollback-journal database (Chroma's) the SHARED lock of one read transaction keeps every writer
    from changing the file (a writer needs EXCLUSIVE to write it, even to spill its cache), so the
    file's bytes are copied by the kernel under it: the committed state, faster than SQLite's
    page-by-page online backup (which held the same lock for longer). A WAL database, whose commits
    may sit in its ``-wal``, goes through the online backup. After a hot journal, the copy is of what ``open_ro`` rolled back."""
    with open_ro(db) as src:
        main = src.execute("PRAGMA database_list").fetchone()[2]
        if src.execute("PRAGMA journal_mode").fetchone()[0] == "wal" or not main:
            dst = sqlite3.connect(str(dest))
            try:
                src.backup(dst)
            finally:
                dst.close()
            return
        begin_read(src)  # SHARED from here to the rollback
        try:
            shutil.copyfile(main, dest)
        finally:
            src.rollback()


# A file's mtime moves with the kernel's coarse clock (a tick of up to 10 ms before Linux 6.13's
# multigrain timestamps), or in whole seconds on some file systems (ext3, ext4 with small inodes, FAT,
# HFS+): a write within the same tick as the one before it leaves the stamp as it was.
RACY_NS = 20_000_000  # a file written more recently than this is not trusted to show the next write


def _tick(mtime_ns: int) -> int:
    """The stamp granularity to allow for: whole seconds when the stamp is one (2 s for FAT's even ones)."""
    return 2 * 10**9 if mtime_ns % (2 * 10**9) == 0 else 10**9 if mtime_ns % 10**9 == 0 else RACY_NS


def unsettled(mtimes_ns: Iterable[int]) -> float:
    """Seconds until files last written at ``mtimes_ns`` are sure to show any later write in their
    stamps: 0 when each was written more than a tick ago (or stamped well ahead of this clock)."""
    now, left = time.time_ns(), 0
    for m in mtimes_ns:
        tick = _tick(m)
        if abs(now - m) < tick:
            left = max(left, m + tick - now)
    return left / 1e9


def private_copy(db: Path, dest: Path, tries: int = 5) -> None:
    """A consistent copy of a SQLite database at ``dest`` that leaves the original untouched where it
    can: a WAL database with no ``-wal`` (no writer has it open) is copied as a file, checked
    unchanged across the copy; otherwise (a writer is in it, or wrote it too recently for its stamp
    to show the next write) ``copy_db`` reads it through a read-only connection, the way any reader would."""
    db, dest = Path(db), Path(dest)
    for _ in range(tries):
        if Path(f"{db}-wal").exists() or Path(f"{db}-journal").exists():
            break
        before = os.stat(db)
        if unsettled([before.st_mtime_ns]):
            break
        shutil.copyfile(db, dest)
        after = os.stat(db)
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns) and \
                not Path(f"{db}-wal").exists():
            return
    copy_db(db, dest)


def palace_db(palace: Path) -> Path:
    return Path(palace) / CHROMA_DB


def segments(conn: sqlite3.Connection, collection: str = DRAWERS_COLLECTION) -> dict[str, str]:
    """{scope: segment id} of a collection (METADATA and VECTOR); empty if there is no such collection."""
    rows = conn.execute("SELECT s.scope, s.id FROM segments s JOIN collections c ON s.collection = c.id "
                        "WHERE c.name = ?", (collection,)).fetchall()
    return dict(rows)


def collection_metadata(conn: sqlite3.Connection, collection: str = DRAWERS_COLLECTION) -> dict:
    rows = conn.execute("SELECT m.key, m.str_value, m.int_value, m.float_value, m.bool_value "
                        "FROM collection_metadata m JOIN collections c ON m.collection_id = c.id "
                        "WHERE c.name = ?", (collection,)).fetchall()
    return {k: next((v for v in vals if v is not None), None) for k, *vals in rows}


def count(conn: sqlite3.Connection, collection: str = DRAWERS_COLLECTION) -> int:
    seg = segments(conn, collection).get("METADATA")
    if seg is None:
        return 0
    return conn.execute("SELECT count(*) FROM embeddings WHERE segment_id = ?", (seg,)).fetchone()[0]


def wing_room_counts(conn: sqlite3.Connection, collection: str = DRAWERS_COLLECTION) -> dict[str, dict[str, int]]:
    seg = segments(conn, collection).get("METADATA")
    out: dict[str, dict[str, int]] = {}
    if seg is None:
        return out
    rows = conn.execute(
        "SELECT w.string_value, r.string_value, count(*) FROM embeddings e "
        "LEFT JOIN embedding_metadata w ON w.id = e.id AND w.key = 'wing' "
        "LEFT JOIN embedding_metadata r ON r.id = e.id AND r.key = 'room' "
        "WHERE e.segment_id = ? GROUP BY 1, 2", (seg,))
    for wing, room, n in rows:
        out.setdefault(wing or "(none)", {})[room or "(none)"] = n
    return out


def quick_check(db: Path, full: bool = False) -> list[str]:
    """``PRAGMA quick_check`` (or ``integrity_check``); [] when the database is ok."""
    try:
        with open_ro(db) as conn:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:  # too damaged to even check ("file is not a database", ...)
        return [str(exc)]
    return [] if rows == ["ok"] else rows


def _value(s, i, f, b):
    if b is not None:
        return bool(b)
    if i is not None:
        return int(i)
    if f is not None:
        return float(f)
    return s


# rows of ``embeddings`` picked by a sub-select, with their metadata: (rowid, id, key, s, i, f, b)
_JOINED = ("SELECT e.id, e.embedding_id, m.key, m.string_value, m.int_value, m.float_value, m.bool_value "
           "FROM ({picked}) e LEFT JOIN embedding_metadata m ON m.id = e.id{keys} ORDER BY e.id")
_PAGE = "SELECT id, embedding_id FROM embeddings WHERE segment_id = ? AND id > ? ORDER BY id LIMIT ?"


def page_rows(conn: sqlite3.Connection, segment: str, after: int, limit: int) -> list[tuple[int, str, str | None, dict]]:
    """Up to ``limit`` rows with rowid > ``after``: (rowid, id, document, metadata), in one short read.

    Each call is its own read transaction, so a long export never holds a lock that
    blocks writers for longer than one page.
    """
    return _assemble(conn.execute(_JOINED.format(picked=_PAGE, keys=""), (segment, after, limit)).fetchall())


def rows_of(conn: sqlite3.Connection, segment: str, ids: list[str]) -> list[tuple[int, str, str | None, dict]]:
    """Like ``page_rows``, for the rows of ``ids`` that exist (by the segment's id index)."""
    out: list[tuple[int, str, str | None, dict]] = []
    for s in range(0, len(ids), 500):
        part = ids[s:s + 500]
        out += _assemble(conn.execute(_JOINED.format(
            picked=f"SELECT id, embedding_id FROM embeddings WHERE segment_id = ? AND embedding_id IN "
                   f"({','.join('?' * len(part))})", keys=""), (segment, *part)).fetchall())
    return out


def row_marks(conn: sqlite3.Connection, segment: str, ids: list[str] | None = None) -> dict[str, int | str]:
    """{id: the sequence number of the write that last touched the row}: Chroma stamps
    ``embeddings.seq_id`` on every add, update and upsert (an integer in 1.x, big-endian bytes in
    older palaces, kept as hex). Ids only, in one query; with ``ids``, of those that exist."""
    picked = "" if ids is None else f" AND embedding_id IN ({','.join('?' * len(ids))})"
    out = dict(conn.execute(f"SELECT embedding_id, seq_id FROM embeddings WHERE segment_id = ?{picked}",
                            (segment, *(ids or ()))))
    if not all(type(seq) is int for seq in out.values()):
        out = {i: seq.hex() if isinstance(seq, bytes) else seq for i, seq in out.items()}
    return out


def newest_rows(conn: sqlite3.Connection, segment: str, n: int) -> list[tuple[str, int]]:
    """The ``n`` rows last written, newest first: (id, sequence number). [] for the byte-string
    sequence numbers of older palaces."""
    rows = conn.execute("SELECT embedding_id, seq_id FROM embeddings WHERE segment_id = ? ORDER BY seq_id DESC "
                        "LIMIT ?", (segment, n)).fetchall()
    return rows if all(type(seq) is int for _, seq in rows) else []


def seq_holders(conn: sqlite3.Connection, segment: str, seqs: list[int]) -> dict[int, str]:
    """{sequence number: the id of the row it last wrote} of those ``seqs`` a row still holds."""
    return {seq: i for i, seq in conn.execute(
        f"SELECT embedding_id, seq_id FROM embeddings WHERE segment_id = ? AND seq_id IN ({','.join('?' * len(seqs))})",
        (segment, *seqs))}


def _assemble(rows: list[tuple]) -> list[tuple[int, str, str | None, dict]]:
    """(rowid, id, document, metadata) from the rows of an embeddings x embedding_metadata join."""
    out: list[tuple[int, str, str | None, dict]] = []
    for rowid, eid, key, s, i, f, b in rows:
        if not out or out[-1][0] != rowid:
            out.append((rowid, eid, None, {}))
        if key is None:
            continue
        if key == "chroma:document":
            out[-1] = (rowid, eid, s, out[-1][3])
        elif not key.startswith("chroma:"):
            out[-1][3][key] = _value(s, i, f, b)
    return out


def page_ids(conn: sqlite3.Connection, segment: str, after: int, limit: int) -> list[tuple[int, str, dict]]:
    """Only the ids: (rowid, id, {}) of up to ``limit`` rows with rowid > ``after``."""
    rows = conn.execute(_PAGE, (segment, after, limit)).fetchall()
    return [(rowid, eid, {}) for rowid, eid in rows]


def page_fields(conn: sqlite3.Connection, segment: str, after: int, limit: int,
                keys: tuple[str, ...]) -> list[tuple[int, str, dict]]:
    """Like ``page_rows`` but only the metadata ``keys`` (``chroma:document`` for the text): (rowid,
    id, {key: value}). Reads a fraction of ``embedding_metadata`` when a check needs few keys."""
    marks = ",".join("?" * len(keys))
    rows = conn.execute(_JOINED.format(picked=_PAGE, keys=f" AND m.key IN ({marks})"),
                        (segment, after, limit, *keys)).fetchall()
    out: list[tuple[int, str, dict]] = []
    for rowid, eid, key, s, i, f, b in rows:
        if not out or out[-1][0] != rowid:
            out.append((rowid, eid, {}))
        if key is not None:
            out[-1][2][key] = _value(s, i, f, b)
    return out


def high_water(conn: sqlite3.Connection) -> int | None:
    """The highest sequence number in this database's log and segments (``embeddings_queue`` keeps
    its newest record through a purge; ``max_seq_id``). Every write, a delete too, raises it, so a
    lower one than before means an older copy of the file. None when it cannot tell (no collection
    yet, or the byte-string sequence numbers of older palaces)."""
    try:
        tops = conn.execute("SELECT (SELECT max(seq_id) FROM max_seq_id), (SELECT max(seq_id) FROM embeddings_queue)"
                            ).fetchone()
    except sqlite3.OperationalError:
        return None
    if any(t is not None and type(t) is not int for t in tops) or all(t is None for t in tops):
        return None
    return max(t for t in tops if t is not None)


def log_coverage(conn: sqlite3.Connection, collection: str = DRAWERS_COLLECTION) -> dict | None:
    """How far the vector index persisted, how far SQLite rows go, and what log is left to replay the gap.

    Chroma persists the HNSW only every ``sync_threshold`` records; the rows after that live in
    ``embeddings_queue`` and are replayed on open. If that tail was purged (two writers purging
    each other's log), the index lacks vectors SQLite has, and nothing can replay them.
    """
    segs = segments(conn, collection)
    if "METADATA" not in segs:
        return None
    seqs = dict(conn.execute("SELECT segment_id, seq_id FROM max_seq_id"))
    (coll_id,) = conn.execute("SELECT id FROM collections WHERE name = ?", (collection,)).fetchone()
    q_min, q_max = conn.execute("SELECT min(seq_id), max(seq_id) FROM embeddings_queue WHERE topic LIKE ?",
                                (f"%/{coll_id}",)).fetchone()
    return {"vector_seq": int(seqs.get(segs.get("VECTOR"), 0) or 0), "metadata_seq": int(seqs.get(segs["METADATA"], 0) or 0),
            "log_min": q_min, "log_max": q_max}


def scrub(db: Path, forgotten: set[str]) -> int:
    """Make deleted rows unrecoverable from ``chroma.sqlite3`` (the caller holds the palace lock and
    has no Chroma client open on it). Three places keep a deleted row's text: the log
    (``embeddings_queue``, whose upsert records hold the document and metadata until an HNSW persist
    purges them), the FTS5 index segments, and free pages. The log records of forgotten rows that
    no segment holds any more lose their metadata (the records stay, so the log's sequence has no
    gap; replayed, each adds a row without text and then deletes it, ending where the palace already
    is), the FTS index is merged (``optimize`` drops deleted entries) and the file is vacuumed.
    ``forgotten`` holds the rows' ``id_key`` hashes. Returns the log records blanked."""
    from .rows import id_key

    removed = 0
    conn = sqlite3.connect(db, timeout=30.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        deleted = [i for (i,) in conn.execute("SELECT DISTINCT id FROM embeddings_queue WHERE id NOT IN "
                                              "(SELECT embedding_id FROM embeddings)") if id_key(i) in forgotten]
        for s in range(0, len(deleted), 500):
            chunk = deleted[s:s + 500]
            removed += conn.execute(f"UPDATE embeddings_queue SET metadata = NULL WHERE id IN "
                                    f"({','.join('?' * len(chunk))}) AND metadata IS NOT NULL", chunk).rowcount
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'embedding_fulltext_search'").fetchone():
            conn.execute("INSERT INTO embedding_fulltext_search(embedding_fulltext_search) VALUES('optimize')")
        conn.execute("COMMIT")
        vacuum(conn)
    finally:
        conn.close()
    return removed


def vacuum(conn: sqlite3.Connection) -> None:
    """Rewrite the database without free pages, and leave no WAL holding old pages."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

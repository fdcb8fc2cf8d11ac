"""A palace directory: embedded Chroma (``chroma.sqlite3`` + HNSW segment directories), the KG
file, the sidecar, ``.palace-etl/``.

Reads that need no vectors (snapshot, rows, info, counts) go to ``chroma.sqlite3`` read-only in
short rowid pages, with no Chroma client and no lock, so live writers are never disturbed; this
store lets go of its own Chroma clients first (in one process, closing a SQLite connection to a
file a Chroma client also has open drops that client's POSIX locks). Vectors and every write go
through a Chroma client under MemPalace's palace lock, one page per lock hold.

``replacing`` builds a whole new palace beside this one and swaps it in with two renames; a swap
cut off between them is finished by the next ``replacing``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import glob
import os
import shutil
import signal
import sqlite3
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from .. import chroma_sqlite, scratch
from ..errors import DiskFull, PalaceEtlError, PalaceLocked, SourceMissing, is_disk_full
from ..hnsw_files import IndexFiles, Untrusted
from ..kg import KnowledgeGraph
from ..layout import (
    CHROMA_DB,
    KG_FILENAME,
    ROUTED_FILE,
    SIDECAR,
    STATE_DIRNAME,
    PalaceLayout,
    layout_for,
)
from ..lock import palace_lock, session_lock
from ..rows import COLLECTIONS, collection_row_hash, id_key, paged
from ..vectors import clear_unused_hnsw_slots, segment_dirs
from .base import ASIDE, READ_PAGE, CollectionInfo, Page
from .chroma import FETCH_PAGE, NEWEST, ChromaStore

COMPLETE = ".palace-etl-restore-complete"  # inside a build that finished and was checked
CRASH_ENV = "PALACE_ETL_TEST_CRASH_AT"  # test-only: kill this process at a named point
SEQ_POSITION = "chroma-seq:"  # a sync state's position: chroma.sqlite3's high-water sequence number


class ChromaDirStore(ChromaStore):
    kind = "chroma"
    _views: tuple[ChromaStore, ...] = ()  # private copies handed out by read_view, closed with the store

    @property
    def root(self) -> Path:
        """The directory the palace occupies (an export must stay out of it)."""
        return self.layout.path

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def db(self) -> Path:
        return self.layout.path / CHROMA_DB

    def exists(self) -> bool:
        return self.db.exists()

    def read_view(self, rows: int) -> ChromaStore:
        """A private copy to read ``rows`` rows from (a ``ChromaDirReader``: no Chroma client opened
        here, vectors read from the files) when copying the palace's files costs less than opening a
        client and paging the rows through it, and the temp directory has room to spare; else this store."""
        if not rows or not self.exists():
            return self
        size = self.db.stat().st_size + sum(n for n, _ in _segment_stamps(self.path).values())
        if size / COPY_BYTES_PER_S >= CLIENT_OPEN_S + rows / CLIENT_ROWS_PER_S or \
                shutil.disk_usage(tempfile.gettempdir()).free < 2 * size:
            return self
        view = ChromaDirReader(self.layout, self.lock_timeout, self.settings)
        try:
            view._copy()
        except (DiskFull, PalaceLocked):  # no room after all, or an index that kept changing: read here
            view.close()
            return self
        self._views = (*self._views, view)
        return view

    def close(self) -> None:
        super().close()
        for view in self._views:
            view.close()
        self._views = ()

    def verified(self, whole: bool = True) -> None:
        pass

    def kept_aside(self) -> list[str]:
        return [str(p) for p in sorted(self.path.parent.glob(f"{glob.escape(self.path.name)}{ASIDE}*"))
                if p.is_dir() and not p.is_symlink()]

    def scrub(self, forgotten: dict[str, set[str]]) -> list[str]:
        notes = []
        if self.exists():
            self.close()  # no Chroma client of ours on the file while a plain connection writes it
            keys = set().union(*(forgotten.get(t, set()) for t in COLLECTIONS))
            with palace_lock(self.path, timeout=self.lock_timeout):
                n = chroma_sqlite.scrub(self.db, keys)
                cleared = clear_unused_hnsw_slots(self.path)
            notes.append(f"{self.db}: {n} log records of deleted rows blanked, full-text index merged, vacuumed "
                         "(the HNSW files keep deleted vectors, marked deleted, no text, until the index is rebuilt)")
            notes += cleared
        return notes + super().scrub(forgotten)

    @contextlib.contextmanager
    def _sqlite(self):
        self.close()  # no Chroma client of ours on the file while a plain connection is open on it
        with chroma_sqlite.open_ro(self.db) as conn:
            yield conn

    def _collection_rows(self, table: str, fields: tuple[str, ...] | None) -> Iterator[Page]:
        if not self.exists():
            return
        keys = None if fields is None else tuple("chroma:document" if f == "document" else f for f in fields)
        with self._sqlite() as conn:
            seg = chroma_sqlite.segments(conn, COLLECTIONS[table]).get("METADATA")
            after = 0
            while seg is not None:
                if keys is None:
                    page = chroma_sqlite.page_rows(conn, seg, after, READ_PAGE)
                    out = [(i, d, m) for _, i, d, m in page]
                else:
                    page = chroma_sqlite.page_fields(conn, seg, after, READ_PAGE, keys) if keys else \
                        chroma_sqlite.page_ids(conn, seg, after, READ_PAGE)
                    out = [(i, m.pop("chroma:document", None), m) for _, i, m in page]
                if not page:
                    break
                after = page[-1][0]
                yield out

    def marks(self) -> dict | None:
        """Each row's ``embeddings.seq_id`` (Chroma stamps it on every add, update and upsert, a
        metadata-only update too) and the collections' metadata segment ids."""
        if not self.exists():
            return None
        with self._sqlite() as conn:
            return _marks_of(conn)

    def _high_water(self) -> int | None:
        if not self.exists():
            return None
        with self._sqlite() as conn:
            return chroma_sqlite.high_water(conn)

    def _position(self) -> str | None:
        top = self._high_water()
        return None if top is None else f"{SEQ_POSITION}{top}"

    def _went_back(self, held: str) -> str | None:
        was = held[len(SEQ_POSITION):] if held.startswith(SEQ_POSITION) else ""
        top = self._high_water() if was.isdigit() else None
        if top is None or top >= int(was):
            return None
        return f"{CHROMA_DB}'s sequence number is {top}, below {was} at its last sync (an older copy of the file)"

    def _recent_rows(self, forgotten):
        """Also each collection's newest rows, as [id, sequence number]. Chroma numbers each write
        once; put back from an older copy, it numbers the writes that follow from the copy's number,
        so those pass the high-water mark saved here again (``_went_back`` no longer sees the copy),
        but they reuse the numbers of the rows the copy lacks."""
        out = super()._recent_rows(forgotten) or {}
        if self.exists():
            with self._sqlite() as conn:
                for t, name in COLLECTIONS.items():
                    seg = chroma_sqlite.segments(conn, name).get("METADATA")
                    if seg:
                        gone = set(forgotten.get(t, ()))
                        newest = chroma_sqlite.newest_rows(conn, seg, NEWEST + len(gone))
                        out[t] = [[i, seq] for i, seq in newest if id_key(i) not in gone][:NEWEST]
        return out or None

    def _recent_rows_gone(self, held):
        why = super()._recent_rows_gone(held)
        if why or not isinstance(held, dict) or not self.exists():
            return why
        with self._sqlite() as conn:
            for t, name in COLLECTIONS.items():
                seg = chroma_sqlite.segments(conn, name).get("METADATA")
                pairs = [(p[0], p[1]) for p in held.get(t, ()) if isinstance(p, list) and len(p) == 2
                         and isinstance(p[0], str) and type(p[1]) is int]
                if seg is None or not pairs:
                    continue
                now = chroma_sqlite.row_marks(conn, seg, [i for i, _ in pairs])
                holders = chroma_sqlite.seq_holders(conn, seg, [seq for _, seq in pairs])
                for i, seq in pairs:
                    if type(now.get(i)) is int and now[i] < seq:
                        return (f"its {t} row {i!r} is older than at its last sync (written at sequence number "
                                f"{now[i]}, then at {seq}): an older copy of {CHROMA_DB}")
                    if holders.get(seq, i) != i:
                        return (f"sequence number {seq}, its {t} row {i!r}'s at its last sync, now belongs to "
                                f"{holders[seq]!r}: an older copy of {CHROMA_DB}, written since")
        return None

    def _hashes(self, table: str, ids: list[str]) -> dict[str, str]:
        with self._sqlite() as conn:
            seg = chroma_sqlite.segments(conn, COLLECTIONS[table]).get("METADATA")
            return {i: collection_row_hash(d, m) for _, i, d, m in chroma_sqlite.rows_of(conn, seg, ids)} if seg else {}

    def info(self, table: str) -> CollectionInfo | None:
        if not self.exists():
            return None
        name = COLLECTIONS[table]
        with self._sqlite() as conn:
            row = conn.execute("SELECT dimension FROM collections WHERE name = ?", (name,)).fetchone()
            if row is None or "METADATA" not in chroma_sqlite.segments(conn, name):
                return None
            return CollectionInfo(chroma_sqlite.count(conn, name), row[0],
                                  chroma_sqlite.collection_metadata(conn, name), chroma_sqlite.log_coverage(conn, name))

    def counts(self) -> dict[str, int]:
        got = {t: 0 for t in COLLECTIONS}
        if self.exists():
            with self._sqlite() as conn:
                got = {t: chroma_sqlite.count(conn, name) for t, name in COLLECTIONS.items()}
        return got | self._kg_counts()

    def integrity(self, full: bool) -> list[tuple[Path, list[str]]]:
        if not self.exists():
            raise SourceMissing(f"verify palace {self.path}: no chroma.sqlite3 there")
        return [(self.db, chroma_sqlite.quick_check(self.db, full))] + self._kg_integrity(self.kg_path, full)

    def session(self, exclusive: bool, timeout: float):
        return session_lock(self.path, exclusive=exclusive, timeout=timeout)

    # ----------------------------------------------------------------- replacing
    def replacing(self, force: bool, timeout: float, check: Callable[["ChromaDirStore"], None],
                  settings: dict | None = None) -> "Replacement":
        return Replacement(self, force, timeout, check, settings)

    def is_empty(self) -> bool:
        return not self.kg_path.exists() and not self.exists()

    def check_target(self) -> None:
        """Refuse, before building anything, a target that is a file or a directory holding something
        other than a palace (a restore replaces palaces, nothing else)."""
        path = self.path
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise PalaceEtlError(f"restore into {path}: it is not a directory; nothing written")
        ours = {CHROMA_DB, self.kg_path.name, self.state_dir.name, SIDECAR}
        if path.is_dir() and any(path.iterdir()) and not ours & {p.name for p in path.iterdir()}:
            raise PalaceEtlError(f"restore into {path}: the directory holds files but no palace; nothing written",
                                 hint="restore into a new or empty directory")


class Replacement:
    """``with store.replacing(force, timeout, check, settings) as swap:`` -- write the new palace into
    ``swap.target`` (a store on a sibling work directory, creating collections with ``settings``); on
    a clean exit ``check(target)`` runs, then the old palace (if any) is renamed aside to
    ``<name>.before-restore-<stamp>`` (``swap.replaced``) and the new one takes its place. Held under
    the session lock (exclusive) and the palace lock for the whole build."""

    def __init__(self, store: ChromaDirStore, force: bool, timeout: float, check: Callable, settings: dict | None):
        self.store, self.force, self.timeout, self.check, self.settings = store, force, timeout, check, settings
        self.recovered: str | None = None
        self.replaced: str | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Replacement":
        store = self.store
        self._stack.enter_context(session_lock(store.path, exclusive=True, timeout=self.timeout))
        self._stack.enter_context(palace_lock(store.path, timeout=self.timeout))
        try:
            self.recovered = self._recover_killed()
            store.check_target()
            if not store.is_empty() and not self.force:
                raise PalaceEtlError(f"restore into {store.name}: it already holds a palace",
                                     hint="restore into a new directory, or pass --force to replace it (kept aside)")
            self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            self.work = store.path.with_name(f".{store.path.name}.restoring-{self.stamp}")
            self.kg_inside = store.kg_path.is_relative_to(store.path)
            self.work_kg = self.work / store.kg_path.relative_to(store.path) if self.kg_inside else \
                self.work.with_name(self.work.name + ".kg")
            self.target = ChromaDirStore(layout_for(self.work, self.work_kg, private=True), store.lock_timeout,
                                         self.settings)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.target.close()
            if exc_type is None:
                self.check(self.target)
                self.target.close()
                _private(self.work)
                (self.work / COMPLETE).touch(mode=0o600)
                self._swap()
        except BaseException:
            self._discard()
            raise
        finally:
            self._stack.close()
        if exc_type is not None:
            self._discard()

    def _discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        if not self.kg_inside and self.work_kg.exists():
            self.work_kg.unlink()

    def _swap(self) -> None:
        store = self.store
        if not store.is_empty():
            aside = store.path.with_name(f"{store.path.name}{ASIDE}{self.stamp}")
            os.rename(store.path, aside)
            self.replaced = str(aside)
            if not self.kg_inside and store.kg_path.exists():
                os.rename(store.kg_path, aside / store.kg_path.name)
        if os.environ.get(CRASH_ENV) == "restore-swap":  # test-only: a kill between the two renames
            os.kill(os.getpid(), signal.SIGKILL)
        if store.path.exists():
            store.path.rmdir()  # an empty directory given as the target
        os.rename(self.work, store.path)
        (store.path / COMPLETE).unlink()
        if not self.kg_inside:
            store.kg_path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.work_kg, store.kg_path)

    def _work_dirs(self) -> list[Path]:
        parent, prefix = self.store.path.parent, f".{self.store.path.name}.restoring-"
        return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()
                      and not p.is_symlink()) if parent.is_dir() else []

    def _recover_killed(self) -> str | None:
        """Clean up after killed restores (called under both locks, so none is running): a complete
        build whose swap was cut off between its two renames is put in place; partial builds are
        removed. Returns the recovered build's name, if any."""
        recovered = None
        for work in self._work_dirs():
            if recovered is None and not self.store.path.exists() and (work / COMPLETE).exists():
                (work / COMPLETE).unlink()
                os.rename(work, self.store.path)
                recovered = work.name
            else:
                shutil.rmtree(work, ignore_errors=True)
        return recovered


def _private(root: Path) -> None:
    """A bundle's modes on the restored palace: directories 0700, files 0600."""
    os.chmod(root, 0o700)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, 0o700 if p.is_dir() else 0o600)



COPY_TRIES = 8  # a wait for files written just now (chroma_sqlite.unsettled) uses one
LIVE_ROWS = 20_000  # an incremental export reads at most this many changed rows from the live file (ChromaLive)
# read_view's rough, cautious cost model; it only chooses between two correct ways to read
COPY_BYTES_PER_S = 1e9  # copying a palace's files (well over this from the page cache, on this machine)
CLIENT_OPEN_S = 1.0  # importing chromadb and opening a client (about that, on this machine)
CLIENT_ROWS_PER_S = 5000  # Chroma's get, rows with their vectors (bench row 5's raw paging: about 5,500)


def _marks_of(conn: sqlite3.Connection) -> dict:
    segs = {t: chroma_sqlite.segments(conn, name).get("METADATA") for t, name in COLLECTIONS.items()}
    rows = {t: chroma_sqlite.row_marks(conn, seg) if seg else {} for t, seg in segs.items()}
    return {"kind": "chroma-seq", "segments": segs, "rows": rows}


def _segment_stamps(palace: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(palace)): (st.st_size, st.st_mtime_ns)
            for seg in segment_dirs(palace) for f in seg.iterdir() if f.is_file() for st in (f.stat(),)}


def copy_segments(palace: Path) -> tuple[Path, dict] | None:
    """A private directory holding a copy of the palace's HNSW segment directories, and their stamps
    taken before the copy; None after waiting for files written just now to settle (a file written
    within the clock's tick before its stamp could be written again with the same stamp:
    ``chroma_sqlite.unsettled``). The copy is consistent with a read of ``chroma.sqlite3`` made after
    it when no segment file changed from before the copy to after that read: Chroma persists its
    index between its SQLite commits and records how far it got in SQLite, so every log entry past
    the persisted index is in the log read then."""
    palace = Path(palace)
    before = _segment_stamps(palace)
    wait = chroma_sqlite.unsettled(m for _, m in before.values())
    if wait:
        time.sleep(wait)
        return None
    tmp = scratch.make(scratch.SNAPSHOT)
    try:
        for seg in segment_dirs(palace):
            shutil.copytree(seg, tmp / seg.name)
    except BaseException:
        scratch.remove(tmp)
        raise
    return tmp, before


def take_copy(palace: Path, segments: tuple[Path, dict] | None = None) -> Path:
    """A private copy of a palace's Chroma files that a Chroma client may open, taken beside live
    writers without their lock: the HNSW segment files (``copy_segments``), then ``chroma.sqlite3``
    under one read transaction (``copy_db``; writers wait only for the copy), retaken when a segment
    file changed in between (then Chroma replays the copied log past the persisted index when it
    opens the copy). Raises when they keep changing. A palace damaged before the copy is copied as it
    is, for verify to report. ``segments``: what ``copy_segments`` gave earlier, to complete first."""
    palace = Path(palace)
    for _ in range(COPY_TRIES):
        got, segments = segments or copy_segments(palace), None
        if got is None:
            continue
        tmp, before = got
        try:
            chroma_sqlite.copy_db(palace / CHROMA_DB, tmp / CHROMA_DB)
            if _segment_stamps(palace) == before:
                return tmp
        except BaseException:
            scratch.remove(tmp)
            raise
        scratch.remove(tmp)
        time.sleep(0.2)
    raise PalaceLocked(f"read palace {palace}: its vector index kept changing while it was copied "
                       f"({COPY_TRIES} tries)", hint="retry when the writers are less busy")


class ChromaCopy(ChromaDirStore):
    """The private copy a ``ChromaDirReader`` reads, which nothing else writes: rows come from its
    ``chroma.sqlite3`` and vectors from its files (``palace.hnsw_files``), with no Chroma client,
    unless the files hold something that module does not reproduce exactly; then that collection is
    read through Chroma, and ``untrusted`` says why."""

    def __init__(self, layout: PalaceLayout, lock_timeout: float = 30.0):
        super().__init__(layout, lock_timeout)
        self._files: dict[str, IndexFiles] = {}
        self.untrusted: dict[str, str] = {}
        self.early_marks: dict | None = None  # the palace's marks read no later than this copy was taken

    def marks(self):
        early, self.early_marks = self.early_marks, None
        return early if early is not None else super().marks()

    def _index(self, table: str, conn: sqlite3.Connection) -> IndexFiles | None:
        if table not in self._files and table not in self.untrusted:
            try:
                self._files[table] = IndexFiles(self.path, conn, COLLECTIONS[table])
            except Untrusted as exc:
                self.untrusted[table] = str(exc)
        return self._files.get(table)

    def prepare(self, changes=False):
        with self._sqlite() as conn:
            for table, name in COLLECTIONS.items():
                if chroma_sqlite.segments(conn, name):
                    self._index(table, conn)

    def fetch(self, table, ids, vectors=True):
        if table not in COLLECTIONS:
            yield from super().fetch(table, ids, vectors)
            return
        for s in range(0, len(ids), FETCH_PAGE):
            part = ids[s:s + FETCH_PAGE]
            page = self._from_files(table, part, vectors)
            if page is None:
                yield from super().fetch(table, part, vectors)
            elif page:
                yield page

    def scan(self, table):
        """Every row in one read: the copy's rows in rowid pages, each with its vector from the files;
        from the first page the files cannot answer, the rest through Chroma."""
        if table not in COLLECTIONS or not self.exists():
            yield from super().scan(table)
            return
        after = 0
        while table not in self.untrusted:
            with self._sqlite() as conn:
                seg = chroma_sqlite.segments(conn, COLLECTIONS[table]).get("METADATA")
                index = self._index(table, conn)
                page = chroma_sqlite.page_rows(conn, seg, after, FETCH_PAGE) if seg and index else []
            if index is None:
                break
            if not page:
                return
            rows = self._with_vectors(table, index, page)
            if rows is None:
                break
            after = page[-1][0]
            yield rows
        with self._sqlite() as conn:
            seg = chroma_sqlite.segments(conn, COLLECTIONS[table]).get("METADATA")
            ids = [i for _, i, _ in chroma_sqlite.page_ids(conn, seg, after, -1)] if seg else []
        yield from ChromaStore.fetch(self, table, ids)

    def _with_vectors(self, table: str, index: IndexFiles | None, rows: list) -> list[dict] | None:
        """``rows`` of ``page_rows`` as fetched rows with their vectors from ``index``; None when it cannot say."""
        if index is None or table in self.untrusted:
            return None
        try:
            embs = index.vectors([i for _, i, _, _ in rows])
        except Untrusted as exc:
            self.untrusted[table] = str(exc)
            return None
        return [{"id": i, "document": d, "metadata": m, "embedding": e} for (_, i, d, m), e in zip(rows, embs)]

    def _from_files(self, table: str, ids: list[str], vectors: bool) -> list[dict] | None:
        """The rows of ``ids`` read from the files, or None when Chroma must be asked."""
        if (vectors and table in self.untrusted) or not self.exists():
            return None
        with self._sqlite() as conn:
            seg = chroma_sqlite.segments(conn, COLLECTIONS[table]).get("METADATA")
            index = self._index(table, conn) if vectors else None
            if seg is None or (vectors and index is None):
                return None
            rows = chroma_sqlite.rows_of(conn, seg, ids)
        if not vectors:
            return [{"id": i, "document": d, "metadata": m} for _, i, d, m in rows]
        return self._with_vectors(table, index, rows)


class _Beyond(Exception):
    """More than a short read of the live file should do: read a whole private copy instead."""


class ChromaLive(ChromaCopy):
    """An incremental export's read of a palace beside live writers that copies the vector index but
    not ``chroma.sqlite3``: the change marks, the rows whose marks moved, with their vectors (from
    the index copy and the log tail), and the collections' counts are read from the live file in one
    read transaction (``read``), as ``take_copy`` reads the database it copies, and are held in
    memory; the export's later reads of those rows are answered from memory. Consistent on
    ``copy_segments``' terms: the caller checks that no segment file changed from before the index
    copy to after the read. Anything more -- every row (no usable marks), more than ``LIVE_ROWS``
    rows, vectors the index files do not answer -- raises ``_Beyond``; the caller takes the whole
    copy instead. The knowledge graph is read from the reader's private copy of it, as before."""

    def __init__(self, layout: PalaceLayout, live_db: Path):
        super().__init__(layout)
        self._live_db = live_db
        self._conn: sqlite3.Connection | None = None
        self._asked: dict[str, set[str]] = {t: set() for t in COLLECTIONS}  # the ids read, found or not
        self._held: dict[str, dict[str, dict]] = {t: {} for t in COLLECTIONS}  # the rows found, with vectors
        self._infos: dict[str, CollectionInfo | None] = {}
        self._kg: dict | None = None

    @property
    def db(self) -> Path:
        return self._live_db

    def _kg_state(self):
        if self._kg is None:  # the KG's own private copy: read once, before the read transaction
            self._kg = super()._kg_state()
        return self._kg

    @contextlib.contextmanager
    def _sqlite(self):
        if self._conn is None:
            raise _Beyond("the live read is over")
        yield self._conn

    def snapshot(self):
        raise _Beyond("every row would be read")

    def _hashes(self, table, ids):
        if sum(map(len, self._asked.values())) + len(ids) > LIVE_ROWS:
            raise _Beyond(f"more than {LIVE_ROWS} rows changed")
        self._asked[table].update(ids)
        rows = self._from_files(table, ids, True)
        if rows is None:
            raise _Beyond(self.untrusted.get(table, "no vector index to read"))
        self._held[table].update((r["id"], r) for r in rows)
        return {r["id"]: collection_row_hash(r["document"], r["metadata"]) for r in rows}

    def preload(self) -> None:
        """Load the index copy's files before the read transaction (finding them takes a short read of
        its own): in it, only the log tail is then read."""
        with chroma_sqlite.open_ro(self._live_db) as conn:
            for table, name in COLLECTIONS.items():
                if chroma_sqlite.segments(conn, name):
                    self._index(table, conn)

    def read(self, known, marks):
        """``changes(known, marks)``, with everything an export of them reads, in one read transaction."""
        self._kg_state()
        with chroma_sqlite.open_ro(self._live_db) as conn:
            chroma_sqlite.begin_read(conn)
            self._conn = conn
            try:
                for table, index in list(self._files.items()):  # preloaded: the log tail of this read
                    try:
                        index.replay(conn)
                    except Untrusted as exc:
                        del self._files[table]
                        self.untrusted[table] = str(exc)
                got = self.changes(known, marks)
                self._infos = {t: ChromaDirStore.info(self, t) for t in COLLECTIONS}
            finally:
                self._conn = None
                conn.rollback()
                self._files.clear()  # the index copy is not read again
        return got

    def covers(self, table: str, ids: list[str]) -> bool:
        return table not in COLLECTIONS or self._asked[table].issuperset(ids)

    def info(self, table):
        return self._infos.get(table)

    def fetch(self, table, ids, vectors=True):
        if table not in COLLECTIONS:  # the knowledge graph's copy
            yield from super().fetch(table, ids, vectors)
            return
        held = self._held[table]
        yield from paged([held[i] for i in ids if i in held], FETCH_PAGE)


class ChromaDirReader(ChromaDirStore):
    """A palace directory read beside live writers (a MemPalace server holding its lease): every read
    comes from one consistent private copy taken on first use -- the Chroma files (``take_copy``),
    the knowledge graph and the run ledger (``chroma_sqlite.private_copy``) -- so the palace is never
    locked, written, renamed or re-stamped, and no Chroma client is opened on it. ``prepare`` reads the
    change marks from the live file while the copy is taken, no later than it. Reports still name
    the live files. Writes are refused."""

    kind = "chroma"

    def __init__(self, layout: PalaceLayout, lock_timeout: float = 30.0, settings: dict | None = None):
        super().__init__(layout, lock_timeout, settings)
        self._view: ChromaCopy | None = None
        self._aux: Path | None = None  # the copies of the KG and the ledger
        self.live_state_dir = layout.state_dir
        self._changes_first = False  # prepare(changes=True): an incremental export, changes read live
        self._next: tuple[ChromaLive, dict] | None = None  # its index copy, loaded by prepare, and its stamps
        self._live: ChromaLive | None = None  # what that read, once it has

    def _side_files(self) -> Path:
        """Private copies of the KG, the run ledger and the hub id map (taken once, beside the Chroma copy)."""
        if self._aux is None:
            self._aux = scratch.make(scratch.SNAPSHOT)
            weakref.finalize(self, scratch.remove, self._aux)  # a reader dropped unclosed leaves no copy
            (self._aux / STATE_DIRNAME).mkdir(mode=0o700)
            if self.kg_path.exists():
                chroma_sqlite.private_copy(self.kg_path, self._aux / KG_FILENAME)
            for name in ("ledger.sqlite3", ROUTED_FILE):
                if (self.live_state_dir / name).is_file():
                    chroma_sqlite.private_copy(self.live_state_dir / name, self._aux / STATE_DIRNAME / name)
        return self._aux

    def _no_room(self, exc: Exception) -> DiskFull:
        return DiskFull(f"read palace {self.path}: the disk is full: no room for a private copy of the "
                        f"palace in {tempfile.gettempdir()} ({exc}); nothing read",
                        hint="free space there, or set TMPDIR to a directory with room for a copy of "
                             "the palace, then run the same command again")

    def _copy(self) -> ChromaCopy:
        if self._view is None:
            try:
                aux = self._side_files()
                tmp = self._chroma_copy()
            except Exception as exc:  # a full temp disk is not a damaged palace
                if is_disk_full(exc):
                    raise self._no_room(exc) from None
                raise
            weakref.finalize(self, scratch.remove, tmp)
            self._view = ChromaCopy(layout_for(tmp, aux / KG_FILENAME, aux / STATE_DIRNAME, private=True),
                                    self.lock_timeout)
            self._view.owner = self  # a read still going on the view keeps the copies (and their finalizers) alive
        return self._view

    def _chroma_copy(self) -> Path:
        """``take_copy`` of the palace; a ``chroma.sqlite3`` it cannot read is named as damaged."""
        pending, self._next = self._next, None  # the index copy prepare took for a live read, not made
        try:
            return take_copy(self.path, pending and (pending[0].path, pending[1]))
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc):
                raise
            raise PalaceEtlError(f"read palace {self.path}: chroma.sqlite3 is damaged ({exc}); nothing read",
                                 hint=f"palace-etl verify --palace {self.path} --full") from None

    @property
    def state_dir(self) -> Path:
        return self._side_files() / STATE_DIRNAME

    @state_dir.setter
    def state_dir(self, value: Path) -> None:
        pass  # set by the base class; the live one is kept in live_state_dir

    def read_view(self, rows: int) -> ChromaStore:
        return self  # reads a private copy already

    def prepare(self, changes: bool = False):
        if not self.exists():
            return
        if changes and self._view is None:  # the rows will come from the live file: copy the rest
            self._changes_first = True
            self._side_files()
            if self._next is None:
                self._next = self._index_copy()
            return
        if self._view is None:
            self._marks_beside_copy()
        self._copy().prepare()

    def _index_copy(self) -> tuple[ChromaLive, dict] | None:
        """A ``ChromaLive`` on a copy of the palace's index (``copy_segments``), its files loaded, and
        their stamps before the copy; None after waiting for files written just now."""
        try:
            got = copy_segments(self.path)
        except Exception as exc:
            if is_disk_full(exc):
                raise self._no_room(exc) from None
            raise
        if got is None:
            return None
        tmp, before = got
        weakref.finalize(self, scratch.remove, tmp)
        aux = self._side_files()
        live = ChromaLive(layout_for(tmp, aux / KG_FILENAME, aux / STATE_DIRNAME, private=True), self.db)
        try:
            live.preload()
        except sqlite3.DatabaseError:
            pass  # read again, in the read that counts (and named as damaged by the whole copy's)
        return live, before

    def _live_changes(self, known, marks):
        """``changes`` read by a ``ChromaLive`` from the live file beside a copy of the index alone;
        None when it cannot be (then the whole copy is taken). Retaken when a segment file changed
        from before the index copy to after the read."""
        pending, self._next = self._next, None
        for _ in range(COPY_TRIES):
            if pending is None:
                pending = self._index_copy()
                if pending is None:
                    continue  # it waited for files written just now
            live, before = pending
            try:
                got = live.read(known, marks)
                steady = _segment_stamps(self.path) == before
            except (_Beyond, sqlite3.DatabaseError):  # a damaged file is named by the whole copy's read
                return None
            finally:
                scratch.remove(live.path)
            if steady:
                self._live = live
                return got
            pending = None
            time.sleep(0.2)
        return None

    def _marks_beside_copy(self) -> None:
        """Take the private copy while the palace's change marks are read from the live file, not
        after: the copy starts once this read holds its SHARED lock, which no writer commits past, so
        the copy shows the marks' moment or a later one -- marks before rows, as ``changes`` needs."""
        with chroma_sqlite.open_ro(self.db) as conn, ThreadPoolExecutor(1) as pool:
            chroma_sqlite.begin_read(conn)
            try:
                copy = pool.submit(self._copy)
                marks = _marks_of(conn)
            finally:
                conn.rollback()  # before waiting on the copy: a writer queued behind this read goes first
            copy.result().early_marks = marks

    def snapshot(self):
        return self._copy().snapshot() if self.exists() else super().snapshot()

    def _high_water(self):
        return self._copy()._high_water() if self.exists() else None

    def _recent_rows(self, forgotten):
        return self._copy()._recent_rows(forgotten) if self.exists() else super()._recent_rows(forgotten)

    def _recent_rows_gone(self, held):
        return self._copy()._recent_rows_gone(held) if self.exists() else super()._recent_rows_gone(held)

    def changes(self, known, marks):
        if not self.exists():
            return super().changes(known, marks)
        if self._changes_first and self._view is None and self._live is None:
            got = self._live_changes(known, marks)
            if got is not None:
                return got
        return self._copy().changes(known, marks)

    def marks(self):
        return self._copy().marks() if self.exists() else None

    def scan(self, table):
        return self._copy().scan(table) if self.exists() else iter(())

    def rows(self, table, fields=None):
        return self._copy().rows(table, fields) if self.exists() else iter(())

    def fetch(self, table, ids, vectors=True):
        if self._live is not None:  # the rows changes() read: later ones from a later copy would not match its hashes
            if not self._live.covers(table, ids):
                raise PalaceEtlError(f"read palace {self.path}: rows asked for beyond the changes read")
            return self._live.fetch(table, ids, vectors)
        return self._copy().fetch(table, ids, vectors) if self.exists() else iter(())

    def info(self, table):
        if self._live is not None:
            return self._live.info(table)
        return self._copy().info(table) if self.exists() else None

    def counts(self):
        return self._copy().counts() if self.exists() else super().counts()

    def nearest(self, table, vectors, k):
        return self._copy().nearest(table, vectors, k)

    def integrity(self, full: bool) -> list[tuple[Path, list[str]]]:
        """Checked on the copies (an exact image of the files), reported by the live files' names."""
        if not self.exists():
            raise SourceMissing(f"verify palace {self.path}: no chroma.sqlite3 there")
        kg = [(self.kg_path, problems) for _, problems in self._kg_integrity(self._side_files() / KG_FILENAME, full)]
        try:
            db = self._copy().db
        except PalaceEtlError:  # too damaged to copy through SQLite: check it in place
            db = self.db
        return [(self.db, chroma_sqlite.quick_check(db, full))] + kg

    def knowledge_graph(self, read_only: bool = True) -> KnowledgeGraph:
        return KnowledgeGraph(self._side_files() / KG_FILENAME, read_only=True)

    def _refuse(self, *args, **kwargs):
        raise PalaceEtlError(f"write palace {self.name}: it was opened for reading only")

    write = delete = set_identity = claim_identity = put_sidecar = replacing = scrub = _refuse

    def session(self, exclusive: bool, timeout: float):
        return contextlib.nullcontext()

    def close(self) -> None:
        super().close()
        self._live = None
        if self._next is not None:
            scratch.remove(self._next[0].path)
            self._next = None
        if self._view is not None:
            self._view.close()
            scratch.remove(self._view.path)
            self._view = None
        if self._aux is not None:
            scratch.remove(self._aux)
            self._aux = None

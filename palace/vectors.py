"""The vector store: a palace's Chroma collections, safe with other processes.

Embedded mode (a palace directory). Chroma 1.5.9 silently corrupts the HNSW
index when two processes write one persist directory, and opening a client is
itself a write (backfill + log purge on the first read). So every write, and
every client open or re-open through its first read, happens under the palace
writer lock (``palace.lock``). Under the lock, before writing, the stamp
(inode, mtime_ns, size) of ``chroma.sqlite3`` is compared with the one taken
after our own last write: if anyone else wrote since, the client is reset
(``clear_system_cache`` + a new client) before we write, so a stale in-memory
index is never persisted over someone else's. After our own writes the stamp
is refreshed, so our writes never look external; the lock is let go only once
the clock tick of our last write has passed, so the next writer's shows.

Reads between writes use the cached client; the external-change check is
rate-limited (``refresh_interval``), except that a vanished database (rebuild,
restore) is noticed at once.

Server mode (``http://host:port``): an ``HttpClient`` to a ``chroma run``
server, which serialises writers itself; no lock, no stamps.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlparse

import numpy as np

from .chroma_sqlite import unsettled
from .errors import CollectionMissing, PalaceEtlError, PalaceLocked, SourceMissing
from .layout import (
    CHROMA_DB,
    DRAWERS_COLLECTION,
    HNSW_METADATA,
    PalaceLayout,
    ensure_space,
)
from .lock import UNSAFE_NO_LOCK_ENV, palace_lock

Stamp = tuple[int, int, int] | None
ROW_BYTES = 8 << 10  # SQLite + log + index growth per upserted row (measured ~4.6 KB at 384-d)


def _settings():
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False, allow_reset=False)


def segment_dirs(palace: Path) -> list[Path]:
    """The HNSW segment directories of a palace (named by their segment's UUID)."""
    return sorted(d for d in Path(palace).glob("*-*-*-*-*") if d.is_dir() and len(d.name) == 36)


HNSW_HEADER = struct.Struct("<iQQQQQQ")  # version (int), offsetLevel0, max_elements, cur_element_count,
#                                          size_per_element, label_offset, offsetData: head of chroma-hnswlib's header.bin


ZEROS = bytes(1 << 20)


def clear_unused_hnsw_slots(palace: Path) -> list[str]:
    """Zero the slots past the element count in each segment's ``data_level0.bin`` and
    ``length.bin``. chroma-hnswlib allocates them for capacity without clearing and persists them
    whole, so they carry whatever the writing process's heap held: texts it had read, deleted ones
    included (seen here: a forgotten drawer's words in an index that persisted 0 elements). No
    reader ever looks past the element count. The caller holds the palace lock, with no client
    open; a header of another shape is left alone and named. The files keep their mtimes."""
    notes = []
    for seg in segment_dirs(palace):
        header, data, lengths = seg / "header.bin", seg / "data_level0.bin", seg / "length.bin"
        if not (header.is_file() and data.is_file()) or header.stat().st_size < HNSW_HEADER.size:
            continue
        with open(header, "rb") as f:
            version, _, capacity, count, size, _, _ = HNSW_HEADER.unpack(f.read(HNSW_HEADER.size))
        if version != 1 or not 0 <= count <= capacity or data.stat().st_size not in (count * size, capacity * size):
            notes.append(f"{seg}: HNSW header not understood, its unused slots were not cleared")
            continue
        cleared = 0
        for path, width in ((data, size), (lengths, 4)):
            if not path.is_file() or path.stat().st_size != capacity * width or count == capacity:
                continue  # persisted to the element count exactly: no unused slots on disk
            st = path.stat()
            with open(path, "r+b") as f:
                f.seek(count * width)
                left = (capacity - count) * width
                while left:  # in bounded pieces: an index's spare capacity can be hundreds of MB
                    left -= f.write(ZEROS[:min(left, len(ZEROS))])
                f.flush()
                os.fsync(f.fileno())
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            cleared = capacity - count
        if cleared:
            notes.append(f"{seg}: {cleared} unused HNSW slots cleared")
    return notes


def damaged_index_files(palace: Path) -> list[Path]:
    """HNSW segment files a cut-off write left empty (Chroma then fails every open of the palace)."""
    return [f for seg in segment_dirs(palace) for f in (seg / "index_metadata.pickle", seg / "header.bin")
            if f.is_file() and f.stat().st_size == 0]


def _unreachable(exc: BaseException) -> bool:
    """A Chroma HttpClient that could not reach its server (it wraps httpx's transport error)."""
    import httpx

    seen = exc
    while seen is not None:
        if isinstance(seen, httpx.TransportError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def db_stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class VectorStore:
    def __init__(self, layout: PalaceLayout, lock_timeout: float = 5.0, open_timeout: float = 60.0,
                 refresh_interval: float = 5.0, collection: str = DRAWERS_COLLECTION,
                 metadata: dict | None = None):
        self.layout = layout
        self.lock_timeout = lock_timeout
        self.open_timeout = open_timeout
        self.refresh_interval = refresh_interval
        self.collection_name = collection
        self.metadata = dict(metadata or HNSW_METADATA)  # for a collection this store creates
        self.client_creations = 0
        self._client = None
        self._collections: dict[str, object] = {}
        self._max_batch: int | None = None
        self._stamp: Stamp = None
        self._last_check = 0.0
        # One thread at a time uses the client: the loader writes from a worker thread while
        # the main thread reads, and a stamp must never be compared mid-way through our own write.
        self._mutex = threading.RLock()

    # ----------------------------------------------------------------- opening
    @property
    def is_server(self) -> bool:
        return self.layout.is_server

    def _locked(self):
        if self.is_server or self.layout.private:  # a private copy: nobody else can write it, no lock file for it
            return contextlib.nullcontext()
        return palace_lock(self.layout.path, timeout=self.lock_timeout)

    def _new_client(self):
        import chromadb
        from chromadb.api.client import SharedSystemClient

        if self.is_server:
            url = urlparse(self.layout.location)
            headers = {}
            if token := os.environ.get("CHROMA_AUTH_TOKEN"):
                headers["Authorization"] = f"Bearer {token}"
            return chromadb.HttpClient(host=url.hostname, port=url.port or 8000, ssl=url.scheme == "https",
                                       headers=headers, settings=_settings())
        # A new PersistentClient in the same process silently returns the cached
        # (stale) system; clear it so the client sees other processes' writes.
        SharedSystemClient.clear_system_cache()
        self.layout.path.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(self.layout.path), settings=_settings())

    def _hnsw_bytes(self) -> int:
        return sum(f.stat().st_size for seg in segment_dirs(self.layout.path) for f in seg.iterdir() if f.is_file())

    def _ensure_space(self, rows: int) -> None:
        """Room for ``rows`` more rows and for Chroma to re-persist its index (which rewrites it)."""
        if not self.is_server:
            ensure_space(self.layout.path, self._hnsw_bytes() + rows * ROW_BYTES, f"write palace {self.layout.path}")

    def _open(self, create: bool) -> None:
        """(Re)create the client and do its first read; caller holds the lock."""
        if self._client is not None and not self.is_server:
            self.close()
        self._ensure_space(0)  # the first read replays Chroma's log into its segments: a write

        def work():
            client = self._new_client()
            cols = {}
            if create:
                cols[self.collection_name] = client.get_or_create_collection(
                    self.collection_name, metadata=dict(self.metadata), embedding_function=None)
            else:
                cols[self.collection_name] = client.get_collection(self.collection_name, embedding_function=None)
            cols[self.collection_name].count()  # the first read backfills: it must run under the lock
            return client, cols

        if not self.is_server:
            self._wait_for_sqlite()
        try:
            value = work()
        except Exception as exc:
            from chromadb.errors import NotFoundError

            damaged = [] if self.is_server else damaged_index_files(self.layout.path)
            if damaged:
                raise PalaceEtlError(
                    f"open palace {self.layout.location}: the vector index file {damaged[0]} is empty or cut "
                    "short (a write was stopped by a full disk or a crash); documents and metadata in "
                    "chroma.sqlite3 are intact", hint=f"stop every process using the palace, then rebuild the "
                    f"index from them: mempalace --palace {self.layout.location} repair rebuild-index") from exc
            if self.is_server and _unreachable(exc):
                raise SourceMissing(f"open palace {self.layout.location}: no Chroma server answers there",
                                    hint="start it: chroma run --path DIR --host HOST --port PORT") from None
            if isinstance(exc, NotFoundError):
                raise CollectionMissing(f"open palace {self.layout.location}: no collection "
                                        f"{self.collection_name!r}") from None
            raise
        self._client, self._collections = value
        self.client_creations += 1
        if not self.is_server:
            self._settled_stamp()
        self._last_check = time.monotonic()

    def _settled_stamp(self) -> None:
        """Take the stamp after our own write (or open), while the lock is still held; first let the
        clock tick of that write pass (``unsettled``), or the next writer's commit could land in the
        same tick, keep the stamp as it is, and its rows be persisted over by our stale index."""
        db = self.layout.path / CHROMA_DB
        stamp = db_stamp(db)
        if stamp is not None and (wait := unsettled([stamp[1]])):
            time.sleep(wait)
            stamp = db_stamp(db)
        self._stamp = stamp

    def _wait_for_sqlite(self) -> None:
        """Bound the open: ``PersistentClient()`` waits up to 1,000 s behind any other connection's lock
        on chroma.sqlite3 (even a read), holding the GIL, so no thread can time it out. Probe first:
        an EXCLUSIVE transaction, rolled back at once, succeeds only when nobody else holds a lock.
        This process has no Chroma client on the file at this point (``_open`` closed it)."""
        db = self.layout.path / CHROMA_DB
        if not db.exists():
            return
        probe = sqlite3.connect(str(db), timeout=self.open_timeout, isolation_level=None)
        try:
            probe.execute("BEGIN EXCLUSIVE")
            probe.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            raise PalaceLocked(f"open palace {self.layout.location}: chroma.sqlite3 stayed locked for "
                               f"{self.open_timeout:g}s (another process holds a SQLite transaction on it)",
                               hint="close sqlite3 shells or DB browsers on the palace and retry") from None
        finally:
            probe.close()

    def _external_change(self) -> bool:
        return db_stamp(self.layout.path / CHROMA_DB) != self._stamp

    # -------------------------------------------------------------- public API
    @contextlib.contextmanager
    def writing(self, create: bool = True) -> Iterator[object]:
        """Yield the collection for writing: under the lock, reset if anyone else wrote."""
        with self._mutex, self._locked():
            # (the unsafe test switch also skips the reset: it models a naive second writer)
            naive = os.environ.get(UNSAFE_NO_LOCK_ENV) == "1"
            if self._client is None or (not self.is_server and not naive and self._external_change()):
                self._open(create)
            yield self._collections[self.collection_name]
            if not self.is_server:
                self._settled_stamp()
                self._last_check = time.monotonic()

    def reading(self):
        """The collection for reading; re-opens (under the lock) on an external change."""
        with self._mutex:
            return self._reading()

    def _reading(self):
        if self._client is None:
            with self._locked():
                self._open(create=False)
        elif not self.is_server:
            vanished = not (self.layout.path / CHROMA_DB).exists()
            due = time.monotonic() - self._last_check >= self.refresh_interval
            if vanished or due:
                self._last_check = time.monotonic()
                if vanished or self._external_change():
                    with self._locked():
                        self._open(create=False)
        return self._collections[self.collection_name]

    def scan(self, include: Sequence[str] = ("documents", "metadatas"),
             page: int = 5000) -> Iterator[tuple[int, str, str | None, dict | None]]:
        """Every row as (position, id, document, metadata), one ``get`` page at a time.

        The way into a server palace (its API is all there is); a local palace is read from
        chroma.sqlite3 by rowid instead (``palace.chroma_sqlite.page_rows``).
        """
        col = self.reading()
        for off in range(0, col.count(), page):
            with self._mutex:
                got = col.get(include=list(include), limit=page, offset=off)
            ids = got["ids"]
            docs = got.get("documents") or [None] * len(ids)
            metas = got.get("metadatas") or [None] * len(ids)
            for k, (i, d, m) in enumerate(zip(ids, docs, metas)):
                yield off + k, i, d, m

    def max_batch_size(self) -> int:
        """The client's ``get_max_batch_size``, asked once per store."""
        if self._max_batch is None:
            with self.writing():
                self._max_batch = int(self._client.get_max_batch_size())
        return self._max_batch

    def upsert(self, ids: Sequence[str], documents: Sequence[str], metadatas: Sequence[dict],
               embeddings: np.ndarray) -> None:
        """Write rows exactly as given. Chroma's upsert merges metadata (a key the new row lacks is
        kept from the old one), so keys the old row has and the new one lacks are sent as None,
        which is how Chroma removes a key: otherwise a replica whose row lost a key (a pgvector
        palace, an edit) could never converge with this one."""
        self._ensure_space(len(ids))
        with self.writing() as col:
            old = col.get(ids=list(ids), include=["metadatas"])
            had = {i: m for i, m in zip(old["ids"], old["metadatas"]) if m}
            metas = []
            for i, m in zip(ids, metadatas):
                gone = had.get(i, {}).keys() - (m or {}).keys()
                metas.append({**(m or {}), **dict.fromkeys(gone)} if gone else m)
            col.upsert(ids=list(ids), documents=list(documents), metadatas=metas, embeddings=embeddings)

    def delete(self, ids: Sequence[str]) -> None:
        with self.writing() as col:
            col.delete(ids=list(ids))

    def get(self, ids: Sequence[str], include: Sequence[str] = ("metadatas", "documents")) -> dict:
        with self._mutex:
            return self.reading().get(ids=list(ids), include=list(include))

    def count(self) -> int:
        with self._mutex:
            return self.reading().count()

    def close(self) -> None:
        if self._client is not None and hasattr(self._client, "close"):
            try:
                self._client.close()
            except Exception:
                pass
        self._client = None
        self._collections = {}

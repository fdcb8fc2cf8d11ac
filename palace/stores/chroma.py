"""What the two Chroma stores share: the collections through ``palace.vectors.VectorStore`` (the
palace lock for every write of a directory palace, one client per collection), the knowledge-graph
SQLite file, the embedder sidecar and palace-etl's own state directory."""
from __future__ import annotations

import sqlite3
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import chroma_sqlite
from ..clock import recorded_zone
from ..errors import CollectionMissing
from ..identity import EmbedderIdentity, check_identity
from ..kg import KnowledgeGraph
from ..layout import SIDECAR, PalaceLayout, atomic_write, read_sidecar, write_sidecar
from ..rows import (
    COLLECTIONS,
    KG_TABLES,
    State,
    collection_row_hash,
    id_key,
    kg_row_hash,
    paged,
)
from ..vectors import VectorStore
from .base import READ_PAGE, Page, SyncStateFile

NEWEST = 4  # a sync state keeps this many newest rows of each table (``_recent_rows``)

FETCH_PAGE = 5000  # rows per Chroma get/upsert: near its max batch (5461 with a dozen metadata keys)


def kg_rows(conn: sqlite3.Connection, table: str, ids: set[str] | None = None) -> Iterator[tuple[int, dict]]:
    """(rowid, {column: value}) of a KG table in rowid pages (each its own short read), optionally only ``ids``."""
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    after = 0
    while rows := conn.execute(f"SELECT rowid, * FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                               (after, READ_PAGE)).fetchall():
        for r in rows:
            if ids is None or r[1] in ids:
                yield r[0], dict(zip(cols, r[1:]))
        after = rows[-1][0]


class ChromaStore(SyncStateFile):
    def __init__(self, layout: PalaceLayout, lock_timeout: float = 30.0, settings: dict | None = None):
        self.layout = layout
        self.name = layout.location
        self.kg_path = layout.kg_path
        self.state_dir = layout.state_dir
        self.lock_timeout = lock_timeout
        self.settings = settings or {}  # table -> collection metadata for collections this store creates
        self.zone = recorded_zone(layout.state_dir)
        self._sync_file = layout.state_dir / "sync-state.json"
        self._vectors: dict[str, VectorStore] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------- the collections
    def _collection(self, table: str) -> VectorStore:
        if table not in COLLECTIONS:
            raise ValueError(f"not a collection: {table!r}")
        if table not in self._vectors:
            self._vectors[table] = VectorStore(self.layout, lock_timeout=self.lock_timeout,
                                               collection=COLLECTIONS[table], metadata=self.settings.get(table))
        return self._vectors[table]

    def _existing(self, table: str) -> VectorStore | None:
        """The collection's client, or None when the palace has no such collection (yet)."""
        if self.root is not None and not self.exists():
            return None  # opening a client on a directory would create a palace there
        store = self._collection(table)
        try:
            store.reading()
        except CollectionMissing:
            return None
        return store

    def snapshot(self) -> State:
        state: State = {t: {} for t in COLLECTIONS}
        for table in COLLECTIONS:
            for page in self.rows(table):
                state[table].update((i, collection_row_hash(d, m)) for i, d, m in page)
        return state | self._kg_state()

    def changes(self, known: State, marks: dict | None) -> tuple[State, dict | None, str | None]:
        """A row whose mark is what it was, in the same collection, is the row ``known`` hashed; the
        others are read and hashed. Marks are read before any row, so a write landing during the call
        shows as a changed mark next time, never as a stale hash."""
        now = self.marks()
        if now is None:
            return self.snapshot(), None, (f"{type(self).__name__} keeps no change marks" if self.exists()
                                           else "no palace yet")
        if marks is None:
            return self.snapshot(), now, "no change marks recorded with the previous state on this machine"
        if marks.get("kind") != now["kind"] or marks.get("segments") != now["segments"]:
            return self.snapshot(), now, "the palace's collections were recreated since (a restore or a rebuild)"
        state: State = {}
        for t, marked in now["rows"].items():
            was, old = marks["rows"].get(t, {}), known.get(t, {})
            # one pass of dict lookups (no tuple per row, as a set difference of items would build)
            redo = [i for i, seq in marked.items() if was.get(i) != seq or i not in old]
            new = self._hashes(t, sorted(redo)) if redo else {}
            state[t] = rows = dict(old)
            for i in [i for i in old if i not in marked] + redo:
                rows.pop(i, None)
            rows.update(new)
        return state | self._kg_state(), now, None

    def _hashes(self, table: str, ids: list[str]) -> dict[str, str]:
        """{id: row hash} of those ``ids`` a collection holds (for ``changes``; a store with marks has it)."""
        raise NotImplementedError

    def rows(self, table: str, fields: tuple[str, ...] | None = None) -> Iterator[Page]:
        if table in KG_TABLES:
            return self._kg_pages(table)
        return self._collection_rows(table, fields)

    def _collection_rows(self, table: str, fields: tuple[str, ...] | None) -> Iterator[Page]:
        raise NotImplementedError

    def scan(self, table: str) -> Iterator[list[dict]]:
        if table in KG_TABLES:  # the KG's rows are whole rows already
            return ([row for _, _, row in page] for page in self._kg_pages(table))
        return super().scan(table)

    def fetch(self, table: str, ids: list[str], vectors: bool = True) -> Iterator[list[dict]]:
        if not ids:
            return
        if table in KG_TABLES:
            if self.kg_path.exists():
                with self._kg_read() as conn:
                    rows = [row for _, row in kg_rows(conn, table, set(ids))]
                yield from paged(rows, FETCH_PAGE)
            return
        store = self._existing(table)
        if store is None:
            return
        include = ["documents", "metadatas", *(["embeddings"] if vectors else [])]
        for s in range(0, len(ids), FETCH_PAGE):
            with store.writing(create=False) as col:  # one lock hold per page: writers get in between
                got = col.get(ids=ids[s:s + FETCH_PAGE], include=include)
            if not got["ids"]:
                continue
            embs = got["embeddings"] if vectors else [None] * len(got["ids"])
            yield [{"id": i, "document": d, "metadata": m or {}, **({"embedding": e} if vectors else {})}
                   for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], embs)]

    def nearest(self, table: str, vectors: np.ndarray, k: int) -> list[tuple[list[str], list[float]]]:
        col = self._collection(table).reading()
        try:
            res = col.query(query_embeddings=vectors, n_results=k, include=["distances"])
            return list(zip(res["ids"], res["distances"]))
        except Exception:  # a damaged index raises ("Error finding id"): find which queries it fails on
            return [self._nearest_one(col, v, k) for v in vectors]

    @staticmethod
    def _nearest_one(col, vector: np.ndarray, k: int) -> tuple[list, list]:
        try:
            res = col.query(query_embeddings=vector[None, :], n_results=k, include=["distances"])
            return res["ids"][0], res["distances"][0]
        except Exception:
            return [], []

    def write(self, table: str, rows: list[dict]) -> None:
        if not rows:
            return
        if table in KG_TABLES:
            with KnowledgeGraph(self.kg_path) as kg:
                kg.replace_rows(table, rows)
            return
        store = self._collection(table)
        step = self.batch_limit(table)
        for s in range(0, len(rows), step):
            chunk = rows[s:s + step]
            store.upsert([r["id"] for r in chunk], [r["document"] for r in chunk],
                         [r["metadata"] or None for r in chunk],
                         np.asarray([r["embedding"] for r in chunk], dtype=np.float32))

    def batch_limit(self, table: str) -> int:
        """The most rows one Chroma write may carry (the client's own ``max_batch_size``)."""
        return self._collection(table).max_batch_size()

    def delete(self, table: str, ids: list[str]) -> None:
        if not ids:
            return
        if table in KG_TABLES:
            if self.kg_path.exists():
                with KnowledgeGraph(self.kg_path) as kg:
                    kg.delete_rows(table, ids)
            return
        store = self._existing(table)
        if store is None:
            return
        step = self.batch_limit(table)
        for s in range(0, len(ids), step):
            store.delete(ids[s:s + step])

    def commit(self) -> None:
        self.close()  # every write is durable already; let go of the clients

    def scrub(self, forgotten: dict[str, set[str]]) -> list[str]:
        """After ``forgotten`` rows were deleted: leave nothing of them recoverable from the files.
        Here the KG; the collections' files are the subclass's (a server's are not ours)."""
        if not self.kg_path.exists():
            return []
        with KnowledgeGraph(self.kg_path) as kg:
            kg.scrub()
        return [f"{self.kg_path}: vacuumed"]

    def close(self) -> None:
        for store in self._vectors.values():
            store.close()
        self._vectors = {}

    # ----------------------------------------------------------- identity, sidecars
    def identity(self) -> EmbedderIdentity | None:
        return read_sidecar(self.layout.sidecar_dir)

    def set_identity(self, ident: EmbedderIdentity) -> None:
        write_sidecar(self.layout.sidecar_dir, ident)

    def claim_identity(self, ident: EmbedderIdentity) -> None:
        with self._collection("drawers").writing(create=True) as col:
            recorded = self.identity()
            check_identity(recorded, ident)
            if recorded is None and col.count() == 0:
                self.set_identity(ident)

    def sidecar(self) -> bytes | None:
        path = self.layout.sidecar_dir / SIDECAR
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None

    def put_sidecar(self, data: bytes) -> None:
        atomic_write(self.layout.sidecar_dir / SIDECAR, data)

    def knowledge_graph(self, read_only: bool = False) -> KnowledgeGraph:
        return KnowledgeGraph(self.kg_path, read_only=read_only)

    # ------------------------------------------------------------------ the KG side
    @staticmethod
    def _kg_integrity(path: Path, full: bool) -> list[tuple[Path, list[str]]]:
        return [(path, chroma_sqlite.quick_check(path, full))] if path.exists() else []

    def _kg_read(self):
        """A read-only connection to the KG: reading never creates, migrates or re-stamps it."""
        return chroma_sqlite.open_ro(self.kg_path)

    def _kg_pages(self, table: str) -> Iterator[list]:
        """``rows`` of a KG table: pages of (id, None, {column: value})."""
        if not self.kg_path.exists():
            return
        with self._kg_read() as conn:
            yield from paged(((row["id"], None, row) for _, row in kg_rows(conn, table)), READ_PAGE)

    def _kg_state(self) -> State:
        state: State = {t: {} for t in KG_TABLES}
        if self.kg_path.exists():
            with self._kg_read() as conn:
                for table in KG_TABLES:
                    if _has_table(conn, table):
                        for _, row in kg_rows(conn, table):
                            state[table][row["id"]] = kg_row_hash(row)
        return state

    def _recent_rows(self, forgotten: dict) -> dict | None:
        """The ids of each KG table's newest rows. MemPalace adds KG rows and never deletes one, so a
        knowledge graph put back from a copy taken before they were written lacks them. Rows being
        forgotten are passed over: they are about to go, and their ids must not be kept."""
        if not self.kg_path.exists():
            return None
        out = {}
        with self._kg_read() as conn:
            for t in KG_TABLES:
                if _has_table(conn, t):
                    gone = set(forgotten.get(t, ()))
                    newest = (i for (i,) in conn.execute(f"SELECT id FROM {t} ORDER BY rowid DESC"))
                    out[t] = list(islice((i for i in newest if id_key(i) not in gone), NEWEST))
        return out

    def _recent_rows_gone(self, held) -> str | None:
        newest = {t: [i for i in ids if isinstance(i, str)] for t, ids in held.items()
                  if t in KG_TABLES and isinstance(ids, list)} if isinstance(held, dict) else {}
        if not any(newest.values()):
            return None
        if not self.kg_path.exists():
            return f"its knowledge graph ({self.kg_path.name}) is gone since its last sync"
        with self._kg_read() as conn:
            lost = [i for t, ids in newest.items() for i in ids if not _has_table(conn, t)
                    or conn.execute(f"SELECT 1 FROM {t} WHERE id = ?", (i,)).fetchone() is None]
        if not lost:
            return None
        return (f"its knowledge graph lacks {len(lost)} of the rows that were its newest at its last sync, "
                f"such as {lost[0]!r} (an older copy of {self.kg_path.name})")

    def _kg_counts(self) -> dict[str, int]:
        if not self.kg_path.exists():
            return {t: 0 for t in KG_TABLES}
        with self._kg_read() as conn:
            return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] if _has_table(conn, t) else 0
                    for t in KG_TABLES}


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() is not None

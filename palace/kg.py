"""The knowledge graph: MemPalace's exact SQLite schema, safe under many writers.

What MemPalace's ``KnowledgeGraph`` lacks (PR #948, never merged) is here:
WAL, a 60 s busy timeout, write transactions that start ``BEGIN IMMEDIATE`` (so
contention shows at BEGIN, never mid-transaction), retries with exponential
backoff and jitter only on "locked"/"busy", bounded WAL growth, and a clean
close that checkpoints the WAL (also at exit). One transaction per batch.
"""
from __future__ import annotations

import atexit
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

from tenacity import (
    retry,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from .errors import PalaceEtlError, PalaceLocked
from .ids import entity_id

BUSY_TIMEOUT_MS = 60_000

# KnowledgeGraph._init_db, MemPalace 3.3.6 and 3.11 (identical)
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS entities (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    type TEXT DEFAULT 'unknown',
    properties TEXT DEFAULT '{}',
    created_at TEXT DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS triples (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    predicate TEXT NOT NULL,
    object TEXT NOT NULL,
    valid_from TEXT,
    valid_to TEXT,
    confidence REAL DEFAULT 1.0,
    source_closet TEXT,
    source_file TEXT,
    source_drawer_id TEXT,
    adapter_name TEXT,
    extracted_at TEXT DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (subject) REFERENCES entities(id),
    FOREIGN KEY (object) REFERENCES entities(id)
);

CREATE INDEX IF NOT EXISTS idx_triples_subject ON triples(subject);
CREATE INDEX IF NOT EXISTS idx_triples_object ON triples(object);
CREATE INDEX IF NOT EXISTS idx_triples_predicate ON triples(predicate);
CREATE INDEX IF NOT EXISTS idx_triples_valid ON triples(valid_from, valid_to);
"""

_UPSERT_ENTITY = """
INSERT INTO entities (id, name, type, properties) VALUES (?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET name=excluded.name, type=excluded.type, properties=excluded.properties
WHERE entities.name IS NOT excluded.name OR entities.type IS NOT excluded.type
   OR entities.properties IS NOT excluded.properties
"""
_ENSURE_ENTITY = "INSERT OR IGNORE INTO entities (id, name) VALUES (?, ?)"
# MemPalace's add_triple returns the existing id when the same (s, p, o) is already
# open; we skip such a row too, unless it is our own id (then we update it). Without
# the index hint SQLite probes by predicate (few distinct values), which makes a bulk
# load quadratic; subjects are far more selective.
_UPSERT_TRIPLE = """
INSERT INTO triples (id, subject, predicate, object, valid_from, valid_to, confidence,
                     source_file, source_drawer_id, adapter_name)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10
WHERE NOT EXISTS (SELECT 1 FROM triples t INDEXED BY idx_triples_subject WHERE t.subject = ?2 AND t.predicate = ?3 AND t.object = ?4
                  AND t.valid_to IS NULL AND ?6 IS NULL AND t.id != ?1)
ON CONFLICT(id) DO UPDATE SET valid_from=excluded.valid_from, valid_to=excluded.valid_to,
    confidence=excluded.confidence, source_file=excluded.source_file,
    source_drawer_id=excluded.source_drawer_id, adapter_name=excluded.adapter_name
WHERE triples.valid_from IS NOT excluded.valid_from OR triples.valid_to IS NOT excluded.valid_to
   OR triples.confidence IS NOT excluded.confidence OR triples.source_file IS NOT excluded.source_file
   OR triples.source_drawer_id IS NOT excluded.source_drawer_id
   OR triples.adapter_name IS NOT excluded.adapter_name
"""


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(
        s in str(exc).lower() for s in ("locked", "busy"))


def _retry_busy(timeout_s: float):
    """Retry only on 'locked'/'busy', with exponential backoff and jitter, for at most ``timeout_s``."""
    return retry(retry=retry_if_exception(_is_busy), wait=wait_random_exponential(multiplier=0.05, max=2),
                 stop=stop_after_delay(timeout_s), reraise=True)

_open_graphs: "weakref.WeakSet[KnowledgeGraph]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for kg in list(_open_graphs):
        kg.close()


class KnowledgeGraph:
    """A connection to one KG file; thread-safe; writes in explicit IMMEDIATE transactions."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS, read_only: bool = False):
        """``read_only`` (status, verify): an existing KG through a read-only connection; nothing is
        created, migrated or checkpointed, and every write raises."""
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        self._retry = _retry_busy(busy_timeout_ms / 1000)
        self._timeout_s = busy_timeout_ms / 1000
        if read_only:
            from .chroma_sqlite import ro_uri

            self._conn = sqlite3.connect(ro_uri(self.path), uri=True, timeout=busy_timeout_ms / 1000,
                                         isolation_level=None, check_same_thread=False)
            _open_graphs.add(self)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
        c = self._conn
        c.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._retry(c.execute)("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA wal_autocheckpoint=1000")
        c.execute("PRAGMA journal_size_limit=67108864")
        c.execute("PRAGMA synchronous=NORMAL")
        self._write(self._init_schema)
        _open_graphs.add(self)

    @staticmethod
    def _init_schema(c: sqlite3.Connection) -> None:
        for stmt in SCHEMA_SQL.split(";"):
            if stmt.strip():
                c.execute(stmt)
        cols = {row[1] for row in c.execute("PRAGMA table_info(triples)")}
        for col in ("source_drawer_id", "adapter_name"):
            if col not in cols:
                c.execute(f"ALTER TABLE triples ADD COLUMN {col} TEXT")

    def _write(self, fn, *args) -> Any:
        """Run ``fn(conn, *args)`` in one BEGIN IMMEDIATE transaction, retrying on busy."""
        if self.read_only:
            raise PalaceEtlError(f"write knowledge graph {self.path}: it was opened read-only")

        @self._retry
        def attempt():
            with self._lock:
                c = self._require()
                c.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(c, *args)
                    c.execute("COMMIT")
                    return result
                except BaseException:
                    c.execute("ROLLBACK")
                    raise

        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise PalaceLocked(f"write knowledge graph {self.path}: another connection kept it locked for "
                                   f"{self._timeout_s:g}s ({exc})",
                                   hint="find the long-running writer (an open sqlite3 shell?) and retry") from exc
            raise

    def scrub(self) -> None:
        """Leave nothing deleted recoverable from the file: secure_delete on, the WAL checkpointed
        away, the file vacuumed (MemPalace's KG readers wait on busy, as for any write)."""
        from .chroma_sqlite import vacuum

        if self.read_only:
            raise PalaceEtlError(f"scrub knowledge graph {self.path}: it was opened read-only")
        with self._lock:
            c = self._require()
            c.execute("PRAGMA secure_delete=ON")
            self._retry(vacuum)(c)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError(f"knowledge graph {self.path} is closed")
        return self._conn

    def write_batch(self, entities: Sequence[tuple[str, str, str, str]],
                    triples: Sequence[tuple]) -> tuple[int, int]:
        """Upsert entities ``(id, name, type, properties)`` and triples in one transaction.

        Triples are ``(id, subject_name, predicate, object_name, valid_from, valid_to,
        confidence, source_file, source_drawer_id, adapter_name)``; endpoints that are
        not entities yet are created as MemPalace does (``INSERT OR IGNORE (id, name)``).
        Returns (entities changed, triples changed); unchanged rows count zero.
        """

        def run(c: sqlite3.Connection) -> tuple[int, int]:
            before = c.total_changes
            c.executemany(_UPSERT_ENTITY, entities)
            endpoints = {}
            rows = []
            for t in triples:
                sub, obj = entity_id(t[1]), entity_id(t[3])
                endpoints.setdefault(sub, t[1])
                endpoints.setdefault(obj, t[3])
                rows.append((t[0], sub, t[2], obj, *t[4:]))
            c.executemany(_ENSURE_ENTITY, list(endpoints.items()))
            mid = c.total_changes
            c.executemany(_UPSERT_TRIPLE, rows)
            return mid - before, c.total_changes - mid

        return self._write(run)

    def replace_rows(self, table: str, rows: list[dict]) -> int:
        """Write whole rows (every column given, as a bundle or another replica holds them) in one transaction."""
        if table not in ("entities", "triples"):
            raise ValueError(f"not a knowledge-graph table: {table!r}")
        if not rows:
            return 0
        cols = list(rows[0])
        sql = f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        self._write(lambda c: c.executemany(sql, [tuple(r[k] for k in cols) for r in rows]))
        return len(rows)

    def delete_rows(self, table: str, ids: list[str]) -> int:
        if table not in ("entities", "triples"):
            raise ValueError(f"not a knowledge-graph table: {table!r}")
        self._write(lambda c: c.executemany(f"DELETE FROM {table} WHERE id = ?", [(i,) for i in ids]))
        return len(ids)

    def execute_write(self, sql: str, params: Iterable = ()) -> int:
        return self._write(lambda c: c.execute(sql, tuple(params)).rowcount)

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock:
            return self._retry(lambda: self._require().execute(sql, tuple(params)).fetchall())()

    def counts(self) -> dict[str, int]:
        (e,), = self.query("SELECT count(*) FROM entities")
        (t,), = self.query("SELECT count(*) FROM triples")
        (cur,), = self.query("SELECT count(*) FROM triples WHERE valid_to IS NULL")
        return {"entities": e, "triples": t, "current_triples": cur}

    def close(self) -> None:
        with self._lock:
            if self._conn is None:
                return
            try:
                if not self.read_only:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass  # a reader holds the WAL; it will be checkpointed by the next writer
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "KnowledgeGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

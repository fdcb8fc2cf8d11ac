"""``PgVectorStore``: a MemPalace 3.11 pgvector palace -- PostgreSQL + pgvector tables beside a local
palace directory that holds the marker, the embedder sidecar, the knowledge graph and ``.palace-etl``.

The layout is MemPalace's own (``mempalace/backends/pgvector.py``), so MemPalace opens, lists and
searches what this store writes:

- the directory holds ``pgvector_backend.json``: ``{backend, schema_version: 1, created_at,
  palace_id, pgvector: {host, port, dbname, namespace, shared_namespace, palace_hash,
  table_prefix}}``; MemPalace refuses a palace whose marker names another target;
- one table per collection, ``<prefix>_<collection slug>``, where the prefix is
  ``mempalace[_<namespace slug>]_<sha256(palace path)[:16]>`` -- or, with a shared namespace,
  ``..._<shared slug>_<sha256(ns slug NUL shared slug)[:12]>`` in the hash's place, which is how
  several machines share one palace -- clamped to PostgreSQL's 63 bytes;
- columns ``id text PRIMARY KEY, document text, metadata jsonb, embedding vector(N), updated_at
  timestamptz``; NUL is stripped from text and metadata, lone surrogates too, as MemPalace does.

Settings come as MemPalace reads them: the DSN from ``MEMPALACE_PGVECTOR_DSN``, then the MemPalace
config file, then ``postgresql://localhost:5432/mempalace``; the namespaces likewise. PostgreSQL is
the concurrency control: no host-local lock is taken (MemPalace's daemon takes none here either),
and every page of a write is one transaction (``COPY`` into a staging table, then one ``INSERT ...
ON CONFLICT``), so any number of writers on any number of machines lose nothing.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import glob
import hashlib
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import orjson

from ..errors import EmbedderMismatch, PalaceEtlError, SourceMissing
from ..identity import EmbedderIdentity, check_identity
from ..layout import atomic_write, layout_for
from ..rows import COLLECTIONS, KG_TABLES, collection_row_hash, id_key, paged
from .base import ASIDE, READ_PAGE, CollectionInfo, Page
from .chroma import NEWEST, ChromaStore

MARKER = "pgvector_backend.json"
DEFAULT_DSN = "postgresql://localhost:5432/mempalace"
MAX_IDENTIFIER = 63
WRITE_PAGE = 1000  # rows per INSERT pipeline (one transaction each)
MARKER_TRIES = 20
PG_POSITION = "pg-tables:"  # a sync state's position: the collection tables' oids
XMIN_IDS = 64  # a sync state names the rows a recent transaction wrote up to this many, else counts them
_SHARED_SEP = re.compile(r"[\s\-./:_]+")
_SHARED_OK = re.compile(r"^[a-z0-9_]*[a-z0-9][a-z0-9_]*$")


class BackendMismatch(PalaceEtlError):
    """The palace's marker names another database, namespace or palace than the settings do."""


# ------------------------------------------------------------------ MemPalace's names
def slug(value: str, fallback: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_]+", "_", value).strip("_") or fallback
    if len(safe) <= 48:
        return safe
    return f"{safe[:35]}_{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def shared_slug(value: str) -> str:
    norm = _SHARED_SEP.sub("_", value.strip().lower()).strip("_")
    if not norm or not _SHARED_OK.match(norm):
        raise PalaceEtlError(f"pgvector shared namespace {value!r}: use letters, digits, '_', '-', '.', '/', ':' "
                             "and spaces, with at least one letter or digit")
    if len(norm) <= 48:
        return norm
    return f"{norm[:35].rstrip('_')}_{hashlib.sha256(norm.encode()).hexdigest()[:12]}"


def identifier(name: str) -> str:
    if len(name.encode("utf-8")) <= MAX_IDENTIFIER:
        return name
    return f"{name[:50]}_{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def palace_id(path: str | os.PathLike) -> str:
    """The palace path as MemPalace names it (``abspath(expanduser)``, not resolved)."""
    return os.path.abspath(os.path.expanduser(str(path)))


@dataclass(frozen=True)
class PgSettings:
    dsn: str = DEFAULT_DSN
    namespace: str | None = None
    shared_namespace: str | None = None

    @classmethod
    def from_environment(cls, dsn: str | None = None) -> "PgSettings":
        """As MemPalace 3.11 reads them: a flag, then the environment, then its config file."""
        from .backend import mempalace_config

        cfg = mempalace_config()

        def pick(env: str, key: str) -> str | None:
            return (os.environ.get(env) or "").strip() or str(cfg.get(key) or "").strip() or None
        shared = pick("MEMPALACE_PGVECTOR_SHARED_NAMESPACE", "pgvector_shared_namespace")
        return cls(dsn or pick("MEMPALACE_PGVECTOR_DSN", "pgvector_dsn") or DEFAULT_DSN,
                   pick("MEMPALACE_PGVECTOR_NAMESPACE", "pgvector_namespace"), shared_slug(shared) if shared else None)

    def prefix(self, palace: str) -> str:
        parts = ["mempalace"]
        ns = slug(self.namespace, "namespace") if self.namespace else ""
        if ns:
            parts.append(ns)
        if self.shared_namespace:
            pair = hashlib.sha256(f"{ns}\x00{self.shared_namespace}".encode()).hexdigest()[:12]
            parts.append(f"{self.shared_namespace}_{pair}")
        else:
            parts.append(palace_hash(palace))
        return "_".join(parts)

    def table(self, palace: str, collection: str) -> str:
        return identifier(f"{self.prefix(palace)}_{slug(collection, 'collection')}")

    def target(self, palace: str) -> dict:
        """The ``pgvector`` block of the marker (the DSN without its credentials)."""
        from urllib.parse import urlparse

        parsed = urlparse(self.dsn)
        return {"host": parsed.hostname or "", "port": parsed.port or 5432, "dbname": (parsed.path or "").lstrip("/"),
                "namespace": self.namespace, "shared_namespace": self.shared_namespace,
                "palace_hash": palace_hash(palace), "table_prefix": self.prefix(palace)}


def palace_hash(palace: str) -> str:
    return hashlib.sha256(palace.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _clean(value):
    """MemPalace's cleaning: NUL and lone surrogates out of every string (dict keys too)."""
    if isinstance(value, str):
        return _no_surrogates(value.replace("\x00", ""))
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _no_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")  # fails exactly when the text holds a lone surrogate
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "ignore")


def _vector_binary(v) -> bytes:
    """pgvector's binary form (what its ``vector_recv`` reads): dimension, 0, big-endian float4s."""
    arr = np.asarray(v, dtype=">f4").ravel()
    return struct.pack(">HH", arr.size, 0) + arr.tobytes()


def _vector(v) -> str:
    """pgvector's text form; each float32 exactly (the shortest repr of its double)."""
    return "[" + ",".join(map(repr, np.asarray(v, dtype=np.float32).tolist())) + "]"


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise PalaceEtlError("a pgvector palace needs psycopg, which is not installed",
                             hint="pip install 'palace-etl[postgres]'") from None
    return psycopg


class PgVectorStore(ChromaStore):
    """A pgvector palace (``root`` is its local directory). Shares the KG, sidecar and sync-state
    handling of the Chroma stores; the collections live in PostgreSQL."""

    kind = "pgvector"

    def __init__(self, root: Path, settings: PgSettings, kg: Path | None = None,
                 collection_settings: dict | None = None):
        layout = layout_for(root, kg)
        super().__init__(layout, 30.0, collection_settings)
        self.root = Path(layout.location)
        self.pg = settings
        self.palace = palace_id(root)
        self.marker = self.root / MARKER
        self._conn = None
        self._dims: dict[str, int] = {}  # known tables' vector dimensions

    def __repr__(self) -> str:
        return f"PgVectorStore({self.name!r})"

    # ------------------------------------------------------------ the connection
    def _db(self):
        if self._conn is None or self._conn.closed:
            psycopg = _psycopg()
            try:
                self._conn = psycopg.connect(self.pg.dsn, autocommit=True, connect_timeout=30)
            except psycopg.OperationalError as exc:
                raise PalaceEtlError(f"open pgvector palace {self.root}: cannot reach PostgreSQL "
                                     f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})",
                                     hint="check MEMPALACE_PGVECTOR_DSN (or pass palace-etl --pgvector-dsn DSN)") from None
        return self._conn

    def _table(self, table: str) -> str:
        if table not in COLLECTIONS:
            raise ValueError(f"not a collection: {table!r}")
        return self.pg.table(self.palace, COLLECTIONS[table])

    def _q(self, table: str) -> str:
        return '"' + self._table(table).replace('"', '""') + '"'

    def _dimension(self, table: str) -> int | None:
        """The table's vector dimension, or None when it does not exist."""
        if table not in self._dims:
            row = self._db().execute(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE c.relname = %s AND a.attname = 'embedding' AND c.relkind = 'r' "
                "AND pg_table_is_visible(c.oid)", (self._table(table),)).fetchone()
            if row is None:
                return None
            m = re.search(r"\((\d+)\)", row[0] or "")
            self._dims[table] = int(m.group(1)) if m else 0
        return self._dims[table]

    # ------------------------------------------------------------------ reads
    def _has_marker(self) -> bool:
        return self.marker.is_file() and not self.marker.is_symlink()

    def exists(self) -> bool:
        """Its marker is here, or its tables are in PostgreSQL (a machine joining a shared namespace
        finds the palace there before it has a marker of its own)."""
        return self._has_marker() or self._dimension("drawers") is not None

    def verified(self, whole: bool = True) -> None:
        """Refuse a marker that names another database, namespace or palace than the settings."""
        if not self._has_marker():
            return
        marker = self._read_marker()
        got = marker.get("pgvector") if isinstance(marker, dict) else None
        want = self.pg.target(self.palace)
        if marker.get("backend") != "pgvector" or not isinstance(got, dict):
            raise BackendMismatch(f"open pgvector palace {self.root}: {MARKER} does not name the pgvector backend")
        wrong = sorted(k for k, v in want.items() if got.get(k) != v)
        if wrong:
            raise BackendMismatch(f"open pgvector palace {self.root}: its marker names another target "
                                  f"({', '.join(f'{k}: {got.get(k)!r}, settings say {want[k]!r}' for k in wrong)})",
                                  hint="use the MEMPALACE_PGVECTOR_DSN and namespaces this palace was made with")

    def _read_marker(self) -> dict:
        """The marker. MemPalace rewrites it in place (truncate, then write) after every upsert, so a
        reader beside a live MemPalace can catch it empty or half-written: such a read is retried."""
        for attempt in range(MARKER_TRIES):
            try:
                marker = orjson.loads(self.marker.read_bytes())
                if isinstance(marker, dict):
                    return marker
            except orjson.JSONDecodeError:
                pass
            time.sleep(0.05 * (attempt + 1))
        raise BackendMismatch(f"open pgvector palace {self.root}: {MARKER} is not a JSON object "
                              f"({MARKER_TRIES} reads)", hint="restore it from a bundle, or from another machine")

    def _write_marker(self) -> None:
        if self._has_marker():
            self.verified()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        marker = {"backend": "pgvector", "schema_version": 1, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "palace_id": self.palace, "pgvector": self.pg.target(self.palace)}
        atomic_write(self.marker, orjson.dumps(marker, option=orjson.OPT_INDENT_2))

    def _collection_rows(self, table: str, fields: tuple[str, ...] | None) -> Iterator[Page]:
        if self._dimension(table) is None:
            return
        want_doc = fields is None or "document" in fields
        keys = None if fields is None else [f for f in fields if f != "document"]
        after = ""
        while True:
            rows = self._db().execute(
                f"SELECT id, {'document' if want_doc else 'NULL'}, metadata FROM {self._q(table)} "
                "WHERE id > %s ORDER BY id LIMIT %s", (after, READ_PAGE)).fetchall()
            if not rows:
                return
            yield [(i, d, m if keys is None else {k: m[k] for k in keys if k in m}) for i, d, m in rows]
            after = rows[-1][0]

    def marks(self) -> dict | None:
        """Each row's ``xmin`` (the transaction that wrote its current version: every insert and
        update makes a new one, and a later transaction never reuses an earlier one's) and each
        table's oid (a table dropped and made again is another)."""
        if not self.exists():
            return None
        segs = self._oids()
        rows = {t: {} if segs[t] is None else dict(self._db().execute(f"SELECT id, xmin::text FROM {self._q(t)}"))
                for t in COLLECTIONS}
        return {"kind": "pg-xmin", "segments": segs, "rows": rows}

    def _oids(self) -> dict[str, str | None]:
        """Each collection table's oid (None: no such table)."""
        found = {t: self._db().execute("SELECT to_regclass(%s)::oid", (self._q(t),)).fetchone()[0] for t in COLLECTIONS}
        return {t: None if oid is None else str(oid) for t, oid in found.items()}

    def _recent_rows(self, forgotten: dict) -> dict | None:
        """Also PostgreSQL's next transaction number, and for each collection the transactions that
        wrote its newest rows, with the ids each still holds (or their count, for a bulk write).
        PostgreSQL never gives a transaction number twice; the database put back from an older
        backup numbers the transactions that follow from the backup's number, so the counter is
        lower than saved here, or, once passed again, a saved number holds rows it did not then."""
        out = super()._recent_rows(forgotten) or {}
        if not self.exists():
            return out or None
        db = self._db()
        out["next_xid"] = str(self._next_xid())
        for t in COLLECTIONS:
            if self._dimension(t) is None:
                continue
            q, gone, wrote = self._q(t), set(forgotten.get(t, ())), {}
            for x, i in db.execute(f"SELECT xmin::text, id FROM {q} WHERE xmin IN "
                                   f"(SELECT xmin FROM {q} ORDER BY age(xmin) LIMIT {NEWEST})"):
                wrote.setdefault(x, []).append(i)
            out[t] = [{"xmin": x, "ids": [i for i in ids if id_key(i) not in gone]} if len(ids) <= XMIN_IDS
                      else {"xmin": x, "count": len(ids)} for x, ids in wrote.items()]
        return out

    def _next_xid(self) -> int:
        """The number PostgreSQL gives the next transaction (64-bit: it never wraps)."""
        return int(self._db().execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()[0])

    def _recent_rows_gone(self, held) -> str | None:
        why = super()._recent_rows_gone(held)
        if why or not isinstance(held, dict) or not self.exists():
            return why
        db = self._db()
        was = held.get("next_xid")
        if isinstance(was, str) and was.isdigit():
            counter = self._next_xid()
            if counter < int(was):
                return (f"PostgreSQL's next transaction number is {counter}, below {was} at its last sync (the "
                        "database put back from an older backup)")
        for t in COLLECTIONS:
            writes = held.get(t)
            saved = {w["xmin"]: w for w in writes if isinstance(w, dict) and isinstance(w.get("xmin"), str)
                     and w["xmin"].isdigit()} if isinstance(writes, list) else {}
            if not saved or self._dimension(t) is None:
                continue
            now: dict[str, list[str]] = {}
            for x, i in db.execute(f"SELECT xmin::text, id FROM {self._q(t)} WHERE xmin = ANY(%s::xid[])",
                                   (list(saved),)):
                now.setdefault(x, []).append(i)
            for x, held_now in now.items():
                ids, n = saved[x].get("ids"), saved[x].get("count")
                other = (sorted(set(held_now) - set(ids)) if isinstance(ids, list) else
                         held_now if type(n) is int and len(held_now) > n else [])
                if other:
                    return (f"transaction {x}, which wrote its newest {t} at its last sync, now holds "
                            f"{other[0]!r}, which it did not then (the database put back from an older backup, "
                            "written since)")
        return None

    def _position(self) -> str | None:
        return PG_POSITION + orjson.dumps(self._oids(), option=orjson.OPT_SORT_KEYS).decode() if self.exists() else None

    def _went_back(self, held: str) -> str | None:
        """Tables made anew since (another oid: a restore, or an older dump loaded back) may hold older rows."""
        try:
            was = orjson.loads(held[len(PG_POSITION):]) if held.startswith(PG_POSITION) else None
        except orjson.JSONDecodeError:
            was = None
        if not isinstance(was, dict):
            return None
        now = self._oids() if self.exists() else {}
        anew = sorted(t for t, oid in was.items() if oid is not None and t in COLLECTIONS and now.get(t) != oid)
        if not anew:
            return None
        return (f"its {' and '.join(anew)} tables were made anew since its last sync (a restore, or an older dump "
                "loaded back)")

    def _hashes(self, table: str, ids: list[str]) -> dict[str, str]:
        return {r["id"]: collection_row_hash(r["document"], r["metadata"])
                for page in self.fetch(table, ids, vectors=False) for r in page}

    def fetch(self, table: str, ids: list[str], vectors: bool = True) -> Iterator[list[dict]]:
        if table in KG_TABLES:
            yield from super().fetch(table, ids, vectors)
            return
        if not ids or self._dimension(table) is None:
            return
        for s in range(0, len(ids), READ_PAGE):
            got = self._db().execute(
                f"SELECT id, document, metadata{', embedding::real[]' if vectors else ''} FROM {self._q(table)} "
                "WHERE id = ANY(%s)", (ids[s:s + READ_PAGE],)).fetchall()
            if got:
                yield [{"id": r[0], "document": r[1], "metadata": r[2] or {},
                        **({"embedding": np.asarray(r[3], dtype=np.float32)} if vectors else {})} for r in got]

    def info(self, table: str) -> CollectionInfo | None:
        dim = self._dimension(table)
        if dim is None:
            return None
        (n,) = self._db().execute(f"SELECT count(*) FROM {self._q(table)}").fetchone()
        return CollectionInfo(n, dim or None, {"hnsw:space": "cosine"})

    def counts(self) -> dict[str, int]:
        got = {t: (info.count if (info := self.info(t)) else 0) for t in COLLECTIONS}
        return got | self._kg_counts()

    def nearest(self, table: str, vectors: np.ndarray, k: int) -> list[tuple[list[str], list[float]]]:
        out = []
        for v in np.asarray(vectors, dtype=np.float32):
            rows = self._db().execute(f"SELECT id, embedding <=> %s::vector AS d FROM {self._q(table)} "
                                      "ORDER BY d LIMIT %s", (_vector(v), k)).fetchall()
            out.append(([r[0] for r in rows], [float(r[1]) for r in rows]))
        return out

    def integrity(self, full: bool) -> list[tuple[Path | str, list[str] | None]]:
        if not self.exists():
            raise SourceMissing(f"verify palace {self.root}: no {MARKER} there")
        self.verified()
        return [(f"postgresql tables {self.pg.prefix(self.palace)}_*", None)] + self._kg_integrity(self.kg_path, full)

    # ----------------------------------------------------------------- writes
    def _create(self, table: str, dimension: int) -> None:
        self._db().execute("CREATE EXTENSION IF NOT EXISTS vector")
        self._db().execute(f"CREATE TABLE IF NOT EXISTS {self._q(table)} (id text PRIMARY KEY, document text NOT NULL "
                           f"DEFAULT '', metadata jsonb NOT NULL DEFAULT '{{}}'::jsonb, embedding vector({int(dimension)}), "
                           "updated_at timestamptz)")
        self._dims.pop(table, None)

    def write(self, table: str, rows: list[dict]) -> None:
        if not rows:
            return
        self._write_marker()  # any write makes this directory a palace MemPalace opens
        if table in KG_TABLES:
            super().write(table, rows)
            return
        dim = self._dimension(table)
        first = np.asarray(rows[0]["embedding"])
        if dim is None:
            self._create(table, first.shape[-1])
        elif dim and first.shape[-1] != dim:
            raise EmbedderMismatch(f"write {table} into {self.root}: {first.shape[-1]}-d vectors into a "
                                   f"{dim}-d pgvector table")
        now = dt.datetime.now(dt.timezone.utc)
        conn, target, stage = self._db(), self._q(table), f"palace_etl_stage_{table}"
        for page in paged(list({r["id"]: r for r in rows}.values()), WRITE_PAGE):  # one version per id
            # COPY into a staging table, then one INSERT ... ON CONFLICT: COPY's speed, upsert semantics,
            # one transaction per page (a page is either all in or not at all)
            with conn.transaction():
                conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {target}) ON COMMIT DELETE ROWS")
                with conn.cursor().copy(f"COPY {stage} (id, document, metadata, embedding, updated_at) "
                                        "FROM STDIN (FORMAT BINARY)") as copy:
                    # binary COPY: psycopg sends bytes fields as they are, so jsonb goes as its version
                    # byte + text and the vector in pgvector's own binary form (no text formatting)
                    copy.set_types(["text", "text", "bytea", "bytea", "timestamptz"])
                    for r in page:
                        meta = orjson.dumps(_clean(r["metadata"] or {}), option=orjson.OPT_SORT_KEYS)
                        copy.write_row((_clean(r["id"]), _clean(r["document"] or ""), b"\x01" + meta,
                                        _vector_binary(r["embedding"]), now))
                conn.execute(f"INSERT INTO {target} SELECT * FROM {stage} ON CONFLICT (id) DO UPDATE SET "
                             "document = EXCLUDED.document, metadata = EXCLUDED.metadata, "
                             "embedding = EXCLUDED.embedding, updated_at = EXCLUDED.updated_at")

    def batch_limit(self, table: str) -> int:
        return WRITE_PAGE

    def delete(self, table: str, ids: list[str]) -> None:
        if not ids:
            return
        if table in KG_TABLES:
            super().delete(table, ids)
            return
        if self._dimension(table) is None:
            return
        for s in range(0, len(ids), WRITE_PAGE):
            self._db().execute(f"DELETE FROM {self._q(table)} WHERE id = ANY(%s)", (ids[s:s + WRITE_PAGE],))

    def commit(self) -> None:
        pass  # every write is its own committed transaction

    def _kept_name(self, table: str, stamp: str) -> str:
        """The name a restore --force gives ``table`` when it keeps it aside (with stamp "": the prefix)."""
        return identifier(f"{self._table(table)[:40]}_before_{stamp}")

    def kept_aside(self) -> list[str]:
        """The tables and knowledge graph files ``PgReplacement`` kept aside (``..._before_<stamp>``)."""
        tables = []
        if self.exists():
            for t in COLLECTIONS:
                tables += [f"PostgreSQL table {n}" for (n,) in self._db().execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND "
                    "starts_with(tablename, %s) ORDER BY 1", (self._kept_name(t, ""),))]
        files = sorted(self.kg_path.parent.glob(f"{glob.escape(self.kg_path.name)}{ASIDE}*"))
        return tables + [str(p) for p in files if p.is_file()]

    def scrub(self, forgotten: dict[str, set[str]]) -> list[str]:
        """VACUUM FULL rewrites the collection tables without their dead rows (it holds an exclusive
        lock on each table for the seconds it takes: MemPalace's queries wait)."""
        notes = []
        for table in COLLECTIONS:
            if forgotten.get(table) and self._dimension(table) is not None:
                self._db().execute(f"VACUUM FULL {self._q(table)}")
                notes.append(f"PostgreSQL table {self._table(table)}: VACUUM FULL")
        return notes + super().scrub(forgotten)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def claim_identity(self, ident: EmbedderIdentity) -> None:
        self._write_marker()
        recorded = self.identity()
        check_identity(recorded, ident)
        drawers = self.info("drawers")
        if recorded is None and not (drawers and drawers.count):
            self.set_identity(ident)

    def session(self, exclusive: bool, timeout: float):
        return contextlib.nullcontext()  # PostgreSQL serialises writers itself; no host-local lease

    def set_identity(self, ident: EmbedderIdentity) -> None:
        self._write_marker()
        super().set_identity(ident)

    def is_empty(self) -> bool:
        return not self.kg_path.exists() and not self.exists()

    def check_target(self) -> None:
        if self.root.is_symlink() or (self.root.exists() and not self.root.is_dir()):
            raise PalaceEtlError(f"restore into {self.root}: it is not a directory; nothing written")

    def replacing(self, force: bool, timeout: float, check: Callable, settings: dict | None = None):
        return PgReplacement(self, force, check)


class PgReplacement:
    """Restore into a pgvector palace: rows go into new tables beside the palace's, checked, then
    swapped in one transaction; the old tables are kept as ``<table>_before_<time>``."""

    def __init__(self, store: PgVectorStore, force: bool, check: Callable):
        self.store, self.force, self.check = store, force, check
        self.recovered = None
        self.replaced = None

    def __enter__(self) -> "PgReplacement":
        store = self.store
        if not store.is_empty() and not self.force:
            raise PalaceEtlError(f"restore into {store.name}: it already holds a palace",
                                 hint="restore into a new directory, or pass --force to replace it (kept aside)")
        self.stamp = time.strftime("%Y%m%d%H%M%S")
        self.target = _Aside(store, self.stamp)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        target = self.target
        if exc_type is not None:
            target.drop()
            return
        try:
            self.check(target)
        except BaseException:
            target.drop()
            raise
        self.replaced = target.swap()


class _Aside(PgVectorStore):
    """The tables a restore fills before they take the palace's place (same marker and settings)."""

    def __init__(self, live: PgVectorStore, stamp: str):
        super().__init__(live.root, live.pg, live.kg_path)
        self.live, self.stamp = live, stamp
        self.kg_path = live.kg_path.with_name(f".{live.kg_path.name}.restoring-{stamp}")
        self.state_dir = live.state_dir

    def _table(self, table: str) -> str:
        return identifier(f"{self.live._table(table)[:40]}_restoring_{self.stamp}")

    def exists(self) -> bool:
        return True

    def _write_marker(self) -> None:
        pass  # the marker is written when the tables take the palace's place

    def drop(self) -> None:
        for t in COLLECTIONS:
            self._db().execute(f"DROP TABLE IF EXISTS {self._q(t)}")
        self.kg_path.unlink(missing_ok=True)
        self.close()

    def swap(self) -> str | None:
        """Rename the new tables into place in one transaction; the old ones are kept aside."""
        live, conn = self.live, self._db()
        kept = None
        with conn.transaction():
            for t in COLLECTIONS:
                if live._dimension(t) is not None:
                    kept = live._kept_name(t, self.stamp)
                    conn.execute(f"ALTER TABLE {live._q(t)} RENAME TO \"{kept}\"")
                if self._dimension(t) is not None:
                    conn.execute(f"ALTER TABLE {self._q(t)} RENAME TO \"{live._table(t)}\"")
        live._dims.clear()
        live._write_marker()
        if self.kg_path.exists():
            if live.kg_path.exists():
                live.kg_path.rename(live.kg_path.with_name(f"{live.kg_path.name}{ASIDE}{self.stamp}"))
            self.kg_path.rename(live.kg_path)
        self.close()
        return kept

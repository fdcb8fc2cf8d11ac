"""Verified, incremental, restorable Parquet bundles of a whole palace.

A bundle is a directory ``<out>/palace-<UTC timestamp>-<full|incr>/`` holding
zstd Parquet files -- drawers and closets with their vectors, KG entities and
triples, tombstones -- a ``state.parquet`` (id and row hash of every row in the
palace at export time, which is what the next incremental diffs against), the
palace's sidecars, and ``manifest.json`` with a sha256 per file. It is written
to a temp directory, fsynced and renamed into place, so a crash never leaves a
half bundle that looks complete.

Reading never disturbs live writers: the snapshot reads ``chroma.sqlite3``
read-only in short rowid pages (no client, no lock); only the rows to export
are then fetched through a Chroma client, one page per palace-lock hold.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from palace import chroma_sqlite
from palace.errors import PalaceEtlError, PalaceLocked, SourceMissing
from palace.kg import KnowledgeGraph
from palace.layout import (
    CLOSETS_COLLECTION,
    DRAWERS_COLLECTION,
    SIDECAR,
    PalaceLayout,
    read_sidecar,
)
from palace.vectors import VectorStore

from .manifest import MANIFEST, BundleError, Manifest, check_files, sha256_file

PAGE = 1000
COLLECTIONS = {"drawers": DRAWERS_COLLECTION, "closets": CLOSETS_COLLECTION}
KG_TABLES = ("entities", "triples")
STATE_SCHEMA = pa.schema([("table", pa.string()), ("id", pa.string()), ("hash", pa.string())])
TOMBSTONE_SCHEMA = pa.schema([("table", pa.string()), ("id", pa.string())])


TINY_FLOAT = 1e-6  # below this, Chroma 1.5.9 moves a float's last digits on every write (measured)


def _canonical(value):
    """A float Chroma cannot store stably (0 < |x| < 1e-6: each write can move its last digits) is
    hashed at 9 significant digits, so one row never hashes two ways across replicas. Every other value
    hashes exactly as before."""
    if isinstance(value, float) and 0 < abs(value) < TINY_FLOAT:
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def row_hash(*parts) -> str:
    parts = tuple(_canonical(p) for p in parts)
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)).hexdigest()[:32]


def record_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("document", pa.string()), ("metadata", pa.string()),
                      ("embedding", pa.list_(pa.float32(), dim))])


@dataclass
class ExportReport:
    bundle: str | None
    kind: str
    previous: str | None
    counts: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    deleted: list = field(default_factory=list)
    dry_run: bool = False
    full_because: str | None = None  # why an --incremental run wrote a full bundle instead
    vanished: dict = field(default_factory=dict)  # table -> rows deleted by a writer during the export


# --------------------------------------------------------------------- snapshot
def palace_state(layout: PalaceLayout) -> dict[str, dict[str, tuple[str, int]]]:
    """{table: {id: (row hash, order)}} of every collection and KG table of a palace or server."""
    return _server_snapshot(layout) if layout.is_server else _snapshot(layout)


def _server_snapshot(layout: PalaceLayout) -> dict[str, dict[str, tuple[str, int]]]:
    """A server has no SQLite file to read: page its API (documents and metadata, no vectors)."""
    state: dict[str, dict[str, tuple[str, int]]] = {}
    for table, name in COLLECTIONS.items():
        state[table] = {}
        store = VectorStore(layout, collection=name)
        try:
            store.reading()
        except PalaceEtlError:
            continue  # no such collection on the server
        try:
            for pos, i, d, m in store.scan():
                state[table][i] = (row_hash(d, m or {}), pos)
        finally:
            store.close()
    state.update(_kg_state(layout))
    return state


def _kg_state(layout: PalaceLayout) -> dict[str, dict[str, tuple[str, int]]]:
    state: dict[str, dict[str, tuple[str, int]]] = {t: {} for t in KG_TABLES}
    if layout.kg_path.exists():
        with KnowledgeGraph(layout.kg_path) as kg:
            for table in KG_TABLES:
                for rowid, row in kg_rows(kg, table):
                    state[table][row["id"]] = (kg_row_hash(row), rowid)
    return state


def _snapshot(layout: PalaceLayout) -> dict[str, dict[str, tuple[str, int]]]:
    """{table: {id: (row hash, rowid)}} for every collection and KG table, read without a client."""
    state: dict[str, dict[str, tuple[str, int]]] = {}
    with chroma_sqlite.open_ro(chroma_sqlite.palace_db(layout.path)) as conn:
        for table, name in COLLECTIONS.items():
            seg = chroma_sqlite.segments(conn, name).get("METADATA")
            state[table] = {}
            after = 0
            while seg is not None:
                rows = chroma_sqlite.page_rows(conn, seg, after, PAGE)
                if not rows:
                    break
                for rowid, eid, doc, meta in rows:
                    state[table][eid] = (row_hash(doc, meta), rowid)
                after = rows[-1][0]
    state.update(_kg_state(layout))
    return state


def kg_row_hash(row: dict) -> str:
    """Hash of a KG row by column name: a migrated KG has its columns in another order."""
    return row_hash(row)


def kg_rows(kg: KnowledgeGraph, table: str, ids: set[str] | None = None) -> Iterator[tuple[int, dict]]:
    """(rowid, {column: value}) of a KG table in rowid pages, optionally only ``ids``."""
    cols = [r[1] for r in kg.query(f"PRAGMA table_info({table})")]
    after = 0
    while rows := kg.query(f"SELECT rowid, * FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, PAGE)):
        for r in rows:
            if ids is None or r[1] in ids:
                yield r[0], dict(zip(cols, r[1:]))
        after = rows[-1][0]


# ------------------------------------------------------------------------ chain
def list_bundles(out: Path) -> list[Path]:
    """Complete bundles in ``out``, oldest first (temp directories are not bundles)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("palace-") and (p / MANIFEST).exists())


def chain(bundle: Path) -> list[Path]:
    """The full bundle and every incremental up to ``bundle``, in apply order."""
    out, seen = [], set()
    cur: Path | None = Path(bundle)
    while cur is not None:
        if cur in seen:
            raise BundleError(f"read bundle chain: {cur} repeats")
        seen.add(cur)
        m = Manifest.load(cur)
        out.append(cur)
        if m.kind == "full":
            return list(reversed(out))
        if not m.previous:
            raise BundleError(f"read bundle {cur}: incremental without a previous bundle")
        cur = cur.parent / m.previous  # a validated bundle name: a sibling, never a path
        if cur.is_symlink() or not cur.is_dir():
            raise BundleError(f"read bundle chain: {cur} (needed by {out[-1].name}) is missing")
    raise BundleError(f"read bundle chain of {bundle}: no full bundle")


def verify_chain(bundle: Path) -> list[str]:
    """Problems with a bundle and every bundle it builds on: manifests, files, sha256s, row counts."""
    problems = []
    for link in chain(Path(bundle)):
        problems += check_files(link, Manifest.load(link))
    return problems


def usable_parent(prev: Path) -> tuple[Path | None, str | None]:
    """(``prev``, None) when an incremental may chain onto it, else (None, why not)."""
    try:
        problems = verify_chain(prev)
    except BundleError as exc:
        problems = [str(exc)]
    if problems:
        return None, f"the newest bundle {prev.name} does not verify ({problems[0]}); writing a full bundle"
    return prev, None


def _previous_state(prev: Path) -> dict[str, dict[str, str]]:
    state: dict[str, dict[str, str]] = {}
    for r in pq.read_table(prev / "state.parquet").to_pylist():
        state.setdefault(r["table"], {})[r["id"]] = r["hash"]
    return state


# ----------------------------------------------------------------------- writing
def _clean_stale_temp(out: Path) -> None:
    """Remove ``.tmp-palace-*`` left by killed exports. Only the holder of the directory's export
    guard writes them, and the caller holds it, so every one present is stale."""
    for p in out.iterdir():
        if p.name.startswith(".tmp-palace-") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _safe_dir(out: Path) -> None:
    for p in [out, *out.parents]:
        if p.is_symlink():
            raise BundleError(f"write bundle to {out}: {p} is a symlink; refusing to write through it")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Guard:
    """Non-blocking 'already running' guard for one backup directory."""

    def __init__(self, out: Path):
        self.path = out / ".export.lock"

    def __enter__(self):
        try:  # never through a symlink: a planted link would have us truncate its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise BundleError(f"export to {self.path.parent}: cannot use {self.path.name} ({exc.strerror}; "
                              "a symlink there is refused)") from None
        self.f = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read().strip() or "another export"
            self.f.close()
            raise PalaceLocked(f"export to {self.path.parent}: already running ({holder})",
                               hint="overlapping cron runs: let the first finish") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()}")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def fetch_rows(store: VectorStore, ids: list[str], page: int = PAGE) -> Iterator[list[dict]]:
    """Pages of collection rows ``{id, document, metadata, embedding}``, one palace-lock hold per page.
    A row deleted since ``ids`` were listed is simply not in its page."""
    for s in range(0, len(ids), page):
        with store.writing(create=False) as col:  # writers get in between pages
            got = col.get(ids=ids[s:s + page], include=["documents", "metadatas", "embeddings"])
        yield [{"id": i, "document": d, "metadata": m or {}, "embedding": e}
               for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"])]


def _records(store: VectorStore, ids: list[str], dim: int, state: dict[str, str],
             vanished: list[str]) -> Iterator[pa.RecordBatch]:
    """The rows of ``ids`` as record batches. A row another writer deleted between the snapshot and
    this fetch is dropped from ``state`` and listed in ``vanished``: the bundle describes what it
    holds, and the next incremental records the deletion."""
    for s in range(0, len(ids), PAGE):
        want = ids[s:s + PAGE]
        page = next(iter(fetch_rows(store, want)), [])
        got = {r["id"] for r in page}
        for i in want:
            if i not in got:
                state.pop(i, None)
                vanished.append(i)
        if page:
            yield records_batch(page, dim)


def _write_table(path: Path, schema: pa.Schema, batches) -> int:
    n = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for b in batches:
            if b.num_rows:
                w.write_batch(b)
                n += b.num_rows
    os.chmod(path, 0o600)
    return n


def _dimension(layout: PalaceLayout, collection: str) -> tuple[int | None, dict]:
    """(vector dimension, collection metadata) of a collection; (None, {}) when it does not exist."""
    if layout.is_server:
        store = VectorStore(layout, collection=collection)
        try:
            col = store.reading()
            first = col.get(limit=1, include=["embeddings"])["embeddings"]
            return (len(first[0]) if len(first) else None), dict(col.metadata or {})
        except PalaceEtlError:
            return None, {}
        finally:
            store.close()
    with chroma_sqlite.open_ro(chroma_sqlite.palace_db(layout.path)) as conn:
        row = conn.execute("SELECT dimension FROM collections WHERE name = ?", (collection,)).fetchone()
        meta = chroma_sqlite.collection_metadata(conn, collection)
    return (row[0] if row else None), meta


def export_bundle(layout: PalaceLayout, out: Path, incremental: bool = False, full_every: int = 7,
                  dry_run: bool = False, lock_timeout: float = 30.0) -> ExportReport:
    if not layout.is_server and not chroma_sqlite.palace_db(layout.path).exists():
        raise SourceMissing(f"export palace {layout.path}: no chroma.sqlite3 there")
    out = Path(out)
    if not layout.is_server and out.resolve().is_relative_to(layout.path):
        raise BundleError(f"export --out {out}: it is inside the palace {layout.path}; a bundle there would be "
                          "taken for the palace's own files", hint="write bundles outside the palace")
    _safe_dir(out)
    with _Guard(out):
        _clean_stale_temp(out)
        prev = list_bundles(out)[-1] if incremental and list_bundles(out) else None
        full_because = None
        if prev is not None:
            prev, full_because = usable_parent(prev)
        if prev is not None and len(chain(prev)) >= full_every:
            prev = None  # a full bundle every N incrementals
        state = palace_state(layout)
        old = _previous_state(prev) if prev else {}
        changed = {t: sorted((i for i, (h, _) in rows.items() if old.get(t, {}).get(i) != h),
                             key=lambda i: rows[i][1]) for t, rows in state.items()}
        gone = [(t, i) for t in old for i in old[t] if i not in state.get(t, {})]
        kind = "incremental" if prev else "full"
        report = ExportReport(None, kind, prev.name if prev else None,
                              counts={t: len(v) for t, v in changed.items()},
                              totals={t: len(v) for t, v in state.items()}, deleted=gone, dry_run=dry_run,
                              full_because=full_because)
        if dry_run:
            return report
        now = dt.datetime.now(dt.timezone.utc)
        name = f"palace-{now:%Y%m%dT%H%M%S%fZ}-{'incr' if prev else 'full'}"
        tmp = out / f".tmp-{name}"
        tmp.mkdir(mode=0o700)
        try:
            files, written, flat, vanished = _write_bundle(layout, tmp, state, changed, gone, lock_timeout)
            report.counts = {t: written.get(t, 0) for t in changed}
            report.totals = {t: len(v) for t, v in flat.items()}
            report.vanished = {t: len(v) for t, v in vanished.items() if v}
            collections = {t: _dimension(layout, n)[1] for t, n in COLLECTIONS.items()}
            ident = read_sidecar(layout.sidecar_dir)
            m = Manifest(name=name, kind=kind, created_at=now.isoformat(), palace=layout.location,
                         embedder={"model_name": ident.model_name, "dimension": ident.dimension} if ident else None,
                         collections=collections, counts=report.counts | {"tombstones": len(gone)},
                         totals=report.totals, files=files, previous=prev.name if prev else None,
                         watermark={"exported_at": now.isoformat(),
                                    "max_rowid": {t: max((r for _, r in v.values()), default=0)
                                                  for t, v in state.items()},
                                    "vanished": report.vanished})
            (tmp / MANIFEST).write_bytes(m.to_json())
            os.chmod(tmp / MANIFEST, 0o600)
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            _fsync_dir(tmp)
            problems = check_files(tmp, Manifest.load(tmp, name))
            if problems:  # never put a bundle in place that does not verify
                raise BundleError(f"export {out / name}: the bundle written does not verify: {problems[0]}")
            os.rename(tmp, out / name)
            _fsync_dir(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        report.bundle = str(out / name)
        return report


def records_batch(rows: list[dict], dim: int) -> pa.RecordBatch:
    """Collection rows ``{id, document, metadata, embedding}`` as a bundle record batch."""
    vecs = np.asarray([r["embedding"] for r in rows], dtype=np.float32).reshape(-1, dim)
    return pa.RecordBatch.from_arrays([
        pa.array([r["id"] for r in rows], pa.string()), pa.array([r["document"] for r in rows], pa.string()),
        pa.array([orjson.dumps(r["metadata"] or {}, option=orjson.OPT_SORT_KEYS).decode() for r in rows],
                 pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), dim)], schema=record_schema(dim))


def write_tables(tmp: Path, collections: dict[str, tuple[int, Iterator[pa.RecordBatch]]], kg: dict[str, list[dict]],
                 gone: list[tuple[str, str]], state: dict[str, dict[str, str]],
                 sidecar: Path | None) -> tuple[dict[str, str], dict[str, int]]:
    """Write a bundle's files into ``tmp``; return ({relative path: sha256}, {table: rows written}).
    ``state`` is written last, so collection readers may still drop vanished rows from it."""
    written = {}
    for table, (dim, batches) in collections.items():
        written[table] = _write_table(tmp / f"{table}.parquet", record_schema(dim), batches)
    for table, rows in kg.items():
        if rows:
            batch = pa.RecordBatch.from_pylist(rows)
            written[table] = _write_table(tmp / f"{table}.parquet", batch.schema, [batch])
    _write_table(tmp / "tombstones.parquet", TOMBSTONE_SCHEMA,
                 [pa.RecordBatch.from_pylist([{"table": t, "id": i} for t, i in gone], schema=TOMBSTONE_SCHEMA)])
    _write_table(tmp / "state.parquet", STATE_SCHEMA, [pa.RecordBatch.from_pylist(
        [{"table": t, "id": i, "hash": h} for t, rows in state.items() for i, h in rows.items()],
        schema=STATE_SCHEMA)])
    (tmp / "sidecars").mkdir(mode=0o700)
    if sidecar is not None and sidecar.exists():
        shutil.copy2(sidecar, tmp / "sidecars" / SIDECAR)
        os.chmod(tmp / "sidecars" / SIDECAR, 0o600)
    return {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}, written


def _write_bundle(layout, tmp: Path, state, changed, gone, lock_timeout):
    """Write the bundle's files; return (files, rows written per table, the state as written, the ids
    per table that vanished between the snapshot and the fetch)."""
    stores = {t: VectorStore(layout, lock_timeout=lock_timeout, collection=c) for t, c in COLLECTIONS.items()}
    flat = {t: {i: h for i, (h, _) in rows.items()} for t, rows in state.items()}
    vanished: dict[str, list[str]] = {t: [] for t in flat}
    try:
        collections = {}
        for table, collection in COLLECTIONS.items():
            dim, _ = _dimension(layout, collection)
            if changed[table] and dim:
                collections[table] = (dim, _records(stores[table], changed[table], dim, flat[table],
                                                    vanished[table]))
        kg = {}
        if layout.kg_path.exists():
            with KnowledgeGraph(layout.kg_path) as g:
                kg = {t: [row for _, row in kg_rows(g, t, set(changed[t]))] for t in KG_TABLES if changed[t]}
        for t, rows in kg.items():
            found = {r["id"] for r in rows}
            for i in changed[t]:
                if i not in found:
                    flat[t].pop(i, None)
                    vanished[t].append(i)
        files, written = write_tables(tmp, collections, kg, gone, flat, layout.sidecar_dir / SIDECAR)
        return files, written, flat, vanished
    finally:
        for store in stores.values():
            store.close()

"""Another MemPalace palace directory, read-only: merging palaces, upgrading old ones.

Drawers come straight from its ``chroma.sqlite3`` (rowid pages, no Chroma client on it) with
their ids kept, so merging the same palace twice writes nothing. Its knowledge graph comes along:
entities and triples keep their ids and validity. Closets (an optional search layer MemPalace
rebuilds on mining) and KG attributes are counted as skipped.

Vectors are carried when the source's embedder identity is known -- its
``mempalace_embedder.json`` (3.11), else Chroma's persisted ``"default"`` function (3.3.6 MiniLM)
-- and the loader finds it equal to the palace's. They are read from a private snapshot: under
the source's writer lock its ``chroma.sqlite3`` is copied with SQLite's backup API and its HNSW
segment directories with it, then a Chroma client opens the copy. The source is never opened by
Chroma (an open writes).
"""
from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator

import orjson
import pyarrow as pa

from importers.quarantine import Quarantine
from palace import chroma_sqlite
from palace.errors import SourceFormatError
from palace.layout import (
    CLOSETS_COLLECTION,
    DRAWERS_COLLECTION,
    KG_FILENAME,
    layout_for,
    read_sidecar,
)
from palace.lock import palace_lock

from .base import ImportOptions, RowBuffer, sqlite_ro, sqlite_tables, tables_of
from .mempalace_jsonl import drawer_from_export

PAGE = 1000
LEGACY_MINILM = ("minilm", "all-minilm-l6-v2", "none", "default")
LOCK_TIMEOUT = 60.0


def source_model(palace: Path) -> str | None:
    """The model name the source palace's vectors were made with, when it can be known (their
    dimension is the vectors' own length; MemPalace records 0 when it could not probe it)."""
    ident = read_sidecar(palace)
    if ident is not None:
        return "minilm" if ident.model_name in LEGACY_MINILM else ident.model_name
    with chroma_sqlite.open_ro(chroma_sqlite.palace_db(palace)) as conn:
        row = conn.execute("SELECT config_json_str FROM collections WHERE name = ?", (DRAWERS_COLLECTION,)).fetchone()
    try:
        ef = (orjson.loads(row[0]) or {}).get("embedding_function") or {} if row and row[0] else {}
    except orjson.JSONDecodeError:
        ef = {}
    return "minilm" if isinstance(ef, dict) and ef.get("name") == "default" else None


@contextlib.contextmanager
def snapshot(palace: Path) -> Iterator[Path]:
    """A private copy of the palace's Chroma files, taken under its writer lock."""
    tmp = Path(tempfile.mkdtemp(prefix="palace-etl-snapshot-"))
    try:
        with palace_lock(palace, timeout=LOCK_TIMEOUT):
            src = sqlite3.connect(chroma_sqlite.ro_uri(chroma_sqlite.palace_db(palace)), uri=True, timeout=60)
            dst = sqlite3.connect(str(tmp / "chroma.sqlite3"))
            try:
                src.backup(dst)
                segs = [r[0] for r in dst.execute("SELECT id FROM segments WHERE scope = 'VECTOR'")]
            finally:
                dst.close()
                src.close()
            for seg in segs:
                if (palace / seg).is_dir():
                    shutil.copytree(palace / seg, tmp / seg)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PalaceImporter:
    name = "palace"

    def detect(self, path: Path) -> bool:
        db = chroma_sqlite.palace_db(Path(path))
        return Path(path).is_dir() and db.is_file() and "collections" in sqlite_tables(db) and bool(
            _segment(db, DRAWERS_COLLECTION))

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path).resolve()
        buf = RowBuffer(self.name, options.batch_size)
        db = chroma_sqlite.palace_db(path)
        if not db.exists():
            return
        model = source_model(path)
        quarantine.skip("closets (a search layer MemPalace rebuilds)", _count(db, CLOSETS_COLLECTION))
        with contextlib.ExitStack() as stack:
            vectors = None
            if model is not None:
                from palace.vectors import VectorStore

                snap = stack.enter_context(snapshot(path))
                db, vectors = snap / "chroma.sqlite3", VectorStore(layout_for(snap), lock_timeout=LOCK_TIMEOUT)
                stack.callback(vectors.close)
            yield from self._drawers(path, db, vectors, model, options, buf, quarantine)
        yield from self._kg(path / KG_FILENAME, buf, quarantine)
        yield from buf.flush(final=True)

    def _drawers(self, path, db, vectors, model, options, buf, quarantine):
        source = str(path)
        with chroma_sqlite.open_ro(db) as conn:
            seg = chroma_sqlite.segments(conn, DRAWERS_COLLECTION).get("METADATA")
            after = 0
            while seg is not None and (page := chroma_sqlite.page_rows(conn, seg, after, PAGE)):
                after = page[-1][0]
                embs = {}
                if vectors is not None:
                    got = vectors.get([r[1] for r in page], include=("embeddings",))
                    embs = dict(zip(got["ids"], got["embeddings"]))
                for rowid, did, doc, meta in page:
                    vec = embs.get(did)
                    try:
                        drawer_from_export(buf, {"id": did, "document": doc, "metadata": meta}, source, options.wing,
                                           ("unfiled", "general"), embedding=None if vec is None else list(vec),
                                           embedder=model)
                    except ValueError as exc:
                        quarantine.add(SourceFormatError(db, None, f"drawer {did} (rowid {rowid}): {exc}"),
                                       orjson.dumps({"id": did, "document": doc, "metadata": meta}))
                    if buf.full():
                        yield from buf.flush()

    def _kg(self, kg: Path, buf: RowBuffer, quarantine: Quarantine):
        if not (kg.exists() and {"entities", "triples"} <= sqlite_tables(kg)):
            return
        conn = sqlite_ro(kg)
        try:
            tables = tables_of(conn)
            names = {}
            for r in conn.execute("SELECT id, name, type, properties FROM entities ORDER BY rowid"):
                try:
                    props = orjson.loads(r["properties"]) if r["properties"] else {}
                except orjson.JSONDecodeError:
                    props = {"properties": r["properties"]}
                names[r["id"]] = r["name"] or r["id"]
                buf.entity(names[r["id"]], r["type"] or "unknown", props if isinstance(props, dict) else {})
            cols = {c[1] for c in conn.execute("PRAGMA table_info(triples)")}
            opt = [c for c in ("source_file", "source_drawer_id", "adapter_name") if c in cols]
            for r in conn.execute("SELECT id, subject, predicate, object, valid_from, valid_to, confidence"
                                  + "".join(f", {c}" for c in opt) + " FROM triples ORDER BY rowid"):
                row = dict(r)
                buf.triple(names.get(row["subject"], row["subject"]), row["predicate"],
                           names.get(row["object"], row["object"]), origin="palace", id=row["id"],
                           valid_from=row["valid_from"], valid_to=row["valid_to"],
                           confidence=1.0 if row["confidence"] is None else float(row["confidence"]),
                           source_file=row.get("source_file"), source_drawer_id=row.get("source_drawer_id"),
                           adapter_name=row.get("adapter_name"))
                if buf.full():
                    yield from buf.flush()
            if "attributes" in tables:
                quarantine.skip("KG attributes (no canonical field yet)",
                                conn.execute("SELECT count(*) FROM attributes").fetchone()[0])
        finally:
            conn.close()


def _segment(db: Path, collection: str) -> str | None:
    try:
        with chroma_sqlite.open_ro(db) as conn:
            return chroma_sqlite.segments(conn, collection).get("METADATA")
    except sqlite3.DatabaseError:
        return None


def _count(db: Path, collection: str) -> int:
    with chroma_sqlite.open_ro(db) as conn:
        return chroma_sqlite.count(conn, collection)

"""Another MemPalace palace directory, read-only: merging palaces, upgrading old ones.

Drawers are read through the palace store (``chroma.sqlite3`` in rowid pages, no Chroma client
on it) with their ids kept, so merging the same palace twice writes nothing. Its knowledge graph comes along:
entities and triples keep their ids and validity. Closets (an optional search layer MemPalace
rebuilds on mining) and KG attributes are counted as skipped.

Vectors are carried when the source's embedder identity is known -- its
``mempalace_embedder.json`` (3.11), else Chroma's persisted ``"default"`` function (3.3.6 MiniLM)
-- and the loader finds it equal to the palace's. They are read from the store's private copy
(``ChromaDirReader``: the HNSW segment directories and SQLite's backup of ``chroma.sqlite3``, taken
without the source's lock and retaken if torn), which a Chroma client then opens; the source itself
is never opened by Chroma (an open writes).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import orjson
import pyarrow as pa

from importers.quarantine import Quarantine
from palace import chroma_sqlite
from palace.errors import SourceFormatError
from palace.layout import CHROMA_DB, DRAWERS_COLLECTION, layout_for, read_sidecar
from palace.stores import ChromaDirReader

from .base import ImportOptions, RowBuffer, sqlite_ro, sqlite_tables
from .mempalace_jsonl import drawer_from_export

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


class PalaceImporter:
    name = "palace"

    def detect(self, path: Path) -> bool:
        db = chroma_sqlite.palace_db(Path(path))
        return Path(path).is_dir() and db.is_file() and "collections" in sqlite_tables(db) and bool(
            _segment(db, DRAWERS_COLLECTION))

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path).resolve()
        buf = RowBuffer(self.name, options.batch_size)
        source = ChromaDirReader(layout_for(path), lock_timeout=LOCK_TIMEOUT)  # a private copy, no lock
        if not source.exists():
            return
        model = source_model(path)
        try:
            quarantine.skip("closets (a search layer MemPalace rebuilds)", source.counts()["closets"])
            yield from self._drawers(path, source, model, options, buf, quarantine)
            yield from self._kg(source, buf, quarantine)
        finally:
            source.close()
        yield from buf.flush(final=True)

    def _drawers(self, path: Path, source: ChromaDirReader, model, options, buf, quarantine):
        if model is None:
            pages = source.rows("drawers")
        else:
            ids = [i for page in source.rows("drawers", ()) for i, _, _ in page]
            pages = ([(r["id"], r["document"], r["metadata"], r["embedding"]) for r in page]
                     for page in source.fetch("drawers", ids))
        for page in pages:
            for did, doc, meta, *vec in page:
                try:
                    drawer_from_export(buf, {"id": did, "document": doc, "metadata": meta}, str(path), options.wing,
                                       ("unfiled", "general"), embedding=list(vec[0]) if vec else None,
                                       embedder=model)
                except ValueError as exc:
                    quarantine.add(SourceFormatError(path / CHROMA_DB, None, f"drawer {did}: {exc}"),
                                   orjson.dumps({"id": did, "document": doc, "metadata": meta}))
                if buf.full():
                    yield from buf.flush()

    def _kg(self, source: ChromaDirReader, buf: RowBuffer, quarantine: Quarantine):
        kg = source.kg_path
        if not (kg.exists() and {"entities", "triples"} <= sqlite_tables(kg)):
            return
        names = {}
        for page in source.rows("entities"):
            for eid, _, r in page:
                try:
                    props = orjson.loads(r.get("properties")) if r.get("properties") else {}
                except orjson.JSONDecodeError:
                    props = {"properties": r.get("properties")}
                names[eid] = r.get("name") or eid
                buf.entity(names[eid], r.get("type") or "unknown", props if isinstance(props, dict) else {})
        for page in source.rows("triples"):
            for tid, _, row in page:
                buf.triple(names.get(row["subject"], row["subject"]), row["predicate"],
                           names.get(row["object"], row["object"]), origin="palace", id=tid,
                           valid_from=row.get("valid_from"), valid_to=row.get("valid_to"),
                           confidence=1.0 if row.get("confidence") is None else float(row["confidence"]),
                           source_file=row.get("source_file"), source_drawer_id=row.get("source_drawer_id"),
                           adapter_name=row.get("adapter_name"))
                if buf.full():
                    yield from buf.flush()
        if "attributes" in sqlite_tables(kg):
            conn = sqlite_ro(kg)
            try:
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

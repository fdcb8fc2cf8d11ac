"""mcp-memory-service (doobidoo): its ``sqlite_vec.db`` and its JSON export.

It embeds with all-MiniLM-L6-v2 (384-d, cosine) -- MemPalace's default model -- so its vectors
are carried over when the palace uses ``minilm`` (the loader decides and reports). The vec0
table's vectors are read from sqlite-vec's own storage tables, so no SQLite extension is needed.

Mapping: content -> drawer, verbatim; wing = ``metadata.project`` (or ``--wing``, else
``mcp_memory_service``); room = ``memory_type`` (else the first tag, else ``general``); tags
``;``-joined. Soft-deleted and superseded rows are skipped and counted; legacy chunked memories
(``metadata.chunk_index`` + ``original_hash``) are reassembled into one drawer; ``memory_graph``
edges become triples between the memories' drawers.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa

from importers.quarantine import Quarantine
from palace import ids
from palace.errors import SourceFormatError

from .base import (
    ImportOptions,
    RowBuffer,
    head,
    is_sqlite,
    json_records,
    origin_drawer_id,
    sqlite_ro,
    sqlite_tables,
    tables_of,
)

ORIGIN = "mcp-memory-service"
MODEL = "minilm"  # all-MiniLM-L6-v2, the identity MemPalace records for it


def _tags(value) -> list[str]:
    if isinstance(value, str):
        value = value.split(",")
    return [t.strip() for t in value or [] if isinstance(t, str) and t.strip()]


class McpMemoryServiceImporter:
    name = "mcp-memory-service"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        if is_sqlite(path):
            tables = sqlite_tables(path)
            return {"memories", "memory_graph"} <= tables or {"memories", "memory_embeddings_rowids"} <= tables
        h = head(path)
        return b'"export_metadata"' in h or (b'"content_hash"' in h and b'"memory_type"' in h)

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path)
        source = str(path.resolve())
        buf = RowBuffer(self.name, options.batch_size)
        records = _database(path) if is_sqlite(path) else _export(path, quarantine)
        chunks: dict[str, list[dict]] = {}
        drawers: dict[str, str] = {}  # content hash -> drawer id
        graph: list[tuple[str, str, str]] = []
        for where, rec in records:
            if where == "edge":
                graph.append(rec)
                continue
            if not isinstance(rec, dict):
                quarantine.add(SourceFormatError(path, None, f"{where}: not a JSON object"), orjson.dumps(rec))
                continue
            if rec.get("deleted_at"):
                quarantine.skip("soft-deleted memories")
                continue
            if rec.get("superseded_by"):
                quarantine.skip("superseded versions")
                continue
            meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
            if meta.get("original_hash") and meta.get("chunk_index") is not None:
                chunks.setdefault(str(meta["original_hash"]), []).append(rec)
                continue
            self._memory(path, where, rec, options, buf, source, quarantine, drawers)
            if buf.full():
                yield from buf.flush()
        for original, parts in chunks.items():  # legacy chunked memories: one drawer again
            parts.sort(key=lambda r: int(r["metadata"]["chunk_index"]))
            whole = {**parts[0], "content": "".join(str(r.get("content") or "") for r in parts),
                     "content_hash": original, "embedding": None}
            self._memory(path, f"chunked memory {original}", whole, options, buf, source, quarantine, drawers)
        for s, rel, o in graph:
            if s in drawers and o in drawers:
                buf.triple(f"memory {s[:16]}", rel, f"memory {o[:16]}", origin=ORIGIN, source_file=source,
                           source_drawer_id=drawers[s])
            else:
                quarantine.add(SourceFormatError(path, None, f"memory_graph edge {s[:16]} -> {o[:16]}: names a "
                                                 "memory that is not imported"), None)
        yield from buf.flush(final=True)

    def _memory(self, path, where, rec, options, buf, source, quarantine, drawers) -> None:
        text = rec.get("content")
        if not isinstance(text, str) or not text.strip():
            quarantine.add(SourceFormatError(path, None, f"{where}: no content"), orjson.dumps(rec, default=str))
            return
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        tags = _tags(rec.get("tags"))
        wing = ids.safe_name(options.wing or meta.get("project") or "mcp_memory_service", "mcp_memory_service")
        room = ids.safe_name(rec.get("memory_type") or (tags[0] if tags else "general"), "general")
        key = str(rec.get("content_hash") or ids.content_sha256(text))
        vec = rec.get("embedding")
        try:
            did = origin_drawer_id(wing, room, ORIGIN, key)
            buf.drawer(id=did, document=text, wing=wing, room=room, source_file=source, chunk_index=0,
                       origin_id=key, created_at=rec.get("created_at"),
                       updated_at=rec.get("updated_at") or rec.get("created_at"),
                       extra={"tags": ";".join(tags), "memory_type": rec.get("memory_type"), "content_hash": key,
                              **{f"meta_{k}": v for k, v in meta.items()}},
                       embedding=vec if isinstance(vec, list) and vec else None, embedder=MODEL)
            drawers[key] = did
        except ValueError as exc:
            quarantine.add(SourceFormatError(path, None, f"{where}: {exc}"), orjson.dumps(rec, default=str))


def _export(path: Path, quarantine: Quarantine) -> Iterator[tuple[str, dict]]:
    for key, n, rec in json_records(path, ("memories",), quarantine):
        yield f"{key or 'memory'} {n}", rec


def _database(path: Path) -> Iterator[tuple[str, object]]:
    conn = sqlite_ro(path)
    try:
        tables = tables_of(conn)
        cols = {r[1] for r in conn.execute("PRAGMA table_info(memories)")}
        vectors = _vectors(conn, tables)
        optional = [c for c in ("deleted_at", "superseded_by") if c in cols]
        rows = conn.execute("SELECT id, content_hash, content, tags, memory_type, metadata, created_at, updated_at"
                            + "".join(f", {c}" for c in optional) + " FROM memories ORDER BY id")
        for r in rows:
            try:
                meta = orjson.loads(r["metadata"]) if r["metadata"] else {}
            except orjson.JSONDecodeError:
                meta = {"metadata": r["metadata"]}
            rec = {k: r[k] for k in ("content_hash", "content", "tags", "memory_type", "created_at", "updated_at",
                                     *optional)}
            vec = vectors(r["id"])
            yield f"memories row id {r['id']}", {**rec, "metadata": meta,
                                                 "embedding": vec.tolist() if vec is not None else None}
        if "memory_graph" in tables:
            for s, t, rel in conn.execute("SELECT source_hash, target_hash, coalesce(relationship_type, 'related') "
                                          "FROM memory_graph ORDER BY source_hash, target_hash"):
                yield "edge", (s, rel, t)
    finally:
        conn.close()


def _vectors(conn, tables: set[str]):
    """rowid -> its vector from the vec0 table ``memory_embeddings`` (chunked float32 blobs)."""
    if not {"memory_embeddings_rowids", "memory_embeddings_vector_chunks00"} <= tables:
        return lambda rowid: None
    where = dict(((r[0], (r[1], r[2])) for r in conn.execute(
        "SELECT rowid, chunk_id, chunk_offset FROM memory_embeddings_rowids")))
    cache: dict[int, np.ndarray] = {}
    dim = None
    for (sql,) in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'memory_embeddings'"):
        m = re.search(r"float\[(\d+)\]", sql or "", re.I)
        dim = int(m.group(1)) if m else None
    if dim is None:
        return lambda rowid: None

    def vector(rowid: int):
        if rowid not in where:
            return None
        chunk, offset = where[rowid]
        if chunk not in cache:
            cache.clear()  # rows come in id order: chunks are visited one after another
            blob = conn.execute("SELECT vectors FROM memory_embeddings_vector_chunks00 WHERE rowid = ?",
                                (chunk,)).fetchone()
            cache[chunk] = np.frombuffer(blob[0], dtype=np.float32).reshape(-1, dim) if blob else None
        arr = cache[chunk]
        return None if arr is None or offset >= len(arr) else arr[offset]

    return vector

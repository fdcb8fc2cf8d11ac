"""The rows every store holds and hands out, and how a row is hashed.

Four tables: the ``drawers`` and ``closets`` collections (rows ``{id, document, metadata,
embedding}``) and the knowledge graph's ``entities`` and ``triples`` (rows ``{column: value}``).
A row hash says whether two stores hold the same version of a row; it covers what MemPalace
reads (text and metadata, or every KG column by name), not the vector, which travels with it.
"""
from __future__ import annotations

import hashlib
import itertools
from typing import Iterable, Iterator, TypeVar

import numpy as np
import orjson
import pyarrow as pa

from .layout import CLOSETS_COLLECTION, DRAWERS_COLLECTION

COLLECTIONS = {"drawers": DRAWERS_COLLECTION, "closets": CLOSETS_COLLECTION}
KG_TABLES = ("entities", "triples")
TABLES = (*COLLECTIONS, *KG_TABLES)
State = dict[str, dict[str, str]]  # table -> {id: row hash}, in the store's own order

T = TypeVar("T")

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


def collection_row_hash(document: str | None, metadata: dict | None) -> str:
    return row_hash(document, metadata or {})


def kg_row_hash(row: dict) -> str:
    """Hash of a KG row by column name: a migrated KG has its columns in another order."""
    return row_hash(row)


def id_key(row_id: str) -> str:
    """How a forgotten id is remembered: its sha256, so the record of what was erased holds no
    part of it (KG entity ids are names, drawer ids hold wing and room)."""
    return hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def table_row_hash(table: str, row: dict) -> str:
    return collection_row_hash(row["document"], row["metadata"]) if table in COLLECTIONS else kg_row_hash(row)


def paged(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter; none when ``items`` is empty)."""
    it = iter(items)
    while page := list(itertools.islice(it, size)):
        yield page


def record_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("document", pa.string()), ("metadata", pa.string()),
                      ("embedding", pa.list_(pa.float32(), dim))])


def records_batch(rows: list[dict], dim: int) -> pa.RecordBatch:
    """Collection rows ``{id, document, metadata, embedding}`` as a bundle record batch."""
    vecs = np.ascontiguousarray(np.asarray([r["embedding"] for r in rows], dtype=np.float32).reshape(-1, dim))
    # from the array's buffer, not pa.array(vecs): that imports numpy.ma (tens of ms) to look for a mask
    flat = pa.Array.from_buffers(pa.float32(), vecs.size, [None, pa.py_buffer(vecs)])
    return pa.RecordBatch.from_arrays([
        pa.array([r["id"] for r in rows], pa.string()), pa.array([r["document"] for r in rows], pa.string()),
        pa.array([orjson.dumps(r["metadata"] or {}, option=orjson.OPT_SORT_KEYS).decode() for r in rows],
                 pa.string()),
        pa.FixedSizeListArray.from_arrays(flat, dim)], schema=record_schema(dim))


def rows_of_batch(batch: pa.RecordBatch) -> list[dict]:
    """A bundle record batch back as collection rows (vectors as a float32 array per row)."""
    n = batch.num_rows
    rows = [{"id": i, "document": d, "metadata": orjson.loads(m) if m else {}}
            for i, d, m in zip(batch.column("id").to_pylist(), batch.column("document").to_pylist(),
                               batch.column("metadata").to_pylist())]
    if "embedding" in batch.schema.names and n:  # a batch read without its vectors has no column
        vecs = batch.column("embedding").values.to_numpy(zero_copy_only=False).reshape(n, -1)
        for k, r in enumerate(rows):
            r["embedding"] = vecs[k]
    return rows

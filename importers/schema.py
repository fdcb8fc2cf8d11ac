"""Canonical Arrow schemas that importers produce and the loader consumes.

Three record kinds travel as ``pa.RecordBatch`` es: drawers, entities and
triples. The kind is carried in the schema metadata (``palace_etl.kind``) so a
single stream can interleave them. ``validate_batch`` is run on every batch the
loader accepts.
"""
from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from palace.errors import SchemaError

SCHEMA_VERSION = 1
KIND_KEY = b"palace_etl.kind"
VERSION_KEY = b"palace_etl.schema_version"
EMBEDDER_KEY = b"palace_etl.embedder"  # on the embedding field: model identity of the vectors

DRAWERS, ENTITIES, TRIPLES = "drawers", "entities", "triples"
TS = pa.timestamp("us", tz="UTC")

_DRAWER_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("document", pa.string(), nullable=False),
    pa.field("wing", pa.string(), nullable=False),
    pa.field("room", pa.string(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("chunk_index", pa.int64(), nullable=False),
    pa.field("added_by", pa.string(), nullable=False),
    pa.field("filed_at", pa.string()),  # MemPalace's naive local ISO; the loader fills it
    pa.field("hall", pa.string()),
    pa.field("origin_system", pa.string(), nullable=False),
    pa.field("origin_id", pa.string(), nullable=False),
    pa.field("content_sha256", pa.string(), nullable=False),
    pa.field("created_at", TS),
    pa.field("updated_at", TS),
    pa.field("extra", pa.string()),  # JSON object of flat scalars, or null
]

_ENTITY_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("type", pa.string(), nullable=False),
    pa.field("properties", pa.string(), nullable=False),  # JSON object
]

_TRIPLE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("subject", pa.string(), nullable=False),  # display name; loader derives the entity id
    pa.field("predicate", pa.string(), nullable=False),  # normalised
    pa.field("object", pa.string(), nullable=False),
    pa.field("valid_from", pa.string()),
    pa.field("valid_to", pa.string()),
    pa.field("confidence", pa.float64(), nullable=False),
    pa.field("source_file", pa.string()),
    pa.field("source_drawer_id", pa.string()),
    pa.field("adapter_name", pa.string(), nullable=False),
]


def _schema(kind: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={KIND_KEY: kind.encode(), VERSION_KEY: str(SCHEMA_VERSION).encode()})


def drawer_schema(embedding_dim: int | None = None, embedder: str | None = None) -> pa.Schema:
    """Drawer schema, optionally with an ``embedding`` fixed_size_list<float32>[dim] column."""
    fields = list(_DRAWER_FIELDS)
    if embedding_dim:
        if not embedder:
            raise SchemaError("an embedding column needs the embedder identity of its vectors")
        fields.append(
            pa.field("embedding", pa.list_(pa.float32(), embedding_dim), metadata={EMBEDDER_KEY: embedder.encode()})
        )
    return _schema(DRAWERS, fields)


ENTITY_SCHEMA = _schema(ENTITIES, _ENTITY_FIELDS)
TRIPLE_SCHEMA = _schema(TRIPLES, _TRIPLE_FIELDS)


def batch_kind(batch: pa.RecordBatch) -> str:
    meta = batch.schema.metadata or {}
    kind = meta.get(KIND_KEY)
    if kind is None:
        raise SchemaError("batch has no palace_etl.kind schema metadata")
    return kind.decode()


def embedding_identity(schema: pa.Schema) -> tuple[str, int] | None:
    """(model identity, dimension) of a drawer batch's vectors, or None when it carries none."""
    if "embedding" not in schema.names:
        return None
    field = schema.field("embedding")
    ident = (field.metadata or {}).get(EMBEDDER_KEY, b"").decode()
    return ident, field.type.list_size


def expected_schema(batch: pa.RecordBatch) -> pa.Schema:
    kind = batch_kind(batch)
    if kind == DRAWERS:
        ident = embedding_identity(batch.schema)
        return drawer_schema(ident[1], ident[0]) if ident else drawer_schema()
    if kind == ENTITIES:
        return ENTITY_SCHEMA
    if kind == TRIPLES:
        return TRIPLE_SCHEMA
    raise SchemaError(f"unknown batch kind {kind!r}")


def validate_batch(batch: pa.RecordBatch) -> str:
    """Check a batch against its canonical schema; return its kind."""
    want = expected_schema(batch)
    if not batch.schema.equals(want, check_metadata=False):
        raise SchemaError(f"{batch_kind(batch)} batch does not match schema v{SCHEMA_VERSION}:\n"
                          f"got {batch.schema}\nwant {want}")
    for field in want:
        if not field.nullable and batch.column(field.name).null_count:
            raise SchemaError(f"{batch_kind(batch)} column {field.name!r} has nulls")
    if batch.num_rows and batch_kind(batch) == DRAWERS:
        ids = batch.column("id")
        if len(pc.unique(ids)) != len(ids):
            raise SchemaError("drawer batch repeats an id")
    return batch_kind(batch)


def extra_json(values: dict[str, Any] | None) -> str | None:
    """Flat-scalar extras as a JSON object string (None when empty)."""
    if not values:
        return None
    flat = {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))}
    return orjson.dumps(flat, option=orjson.OPT_SORT_KEYS).decode() if flat else None

"""What every importer shares: the protocol, options, and a row buffer that builds batches."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import orjson
import pyarrow as pa

from etl import ids
from etl.runs import Quarantine
from etl.schema import ENTITY_SCHEMA, TRIPLE_SCHEMA, drawer_schema, extra_json


@dataclass(frozen=True)
class ImportOptions:
    wing: str | None = None  # overrides the importer's default wing
    batch_size: int = 1000  # drawer rows per batch

    def to_dict(self) -> dict:
        return {"wing": self.wing, "batch_size": self.batch_size}


class Importer(Protocol):
    name: str
    description: str

    def detect(self, path: Path) -> bool:
        """Cheap sniff: does ``path`` look like this importer's format?"""

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        """Stream canonical drawer / entity / triple batches; report bad records to ``quarantine``."""


def to_utc(value: Any) -> dt.datetime | None:
    """Parse an ISO string or epoch seconds/milliseconds into an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        secs = value / 1000 if value > 1e11 else value
        return dt.datetime.fromtimestamp(secs, tz=dt.timezone.utc)
    text = str(value).strip().replace("Z", "+00:00")
    parsed = dt.datetime.fromisoformat(text)
    return parsed.replace(tzinfo=dt.timezone.utc) if parsed.tzinfo is None else parsed.astimezone(dt.timezone.utc)


class RowBuffer:
    """Accumulates canonical rows and hands out full batches."""

    def __init__(self, origin_system: str, batch_size: int):
        self.origin_system = origin_system
        self.batch_size = batch_size
        self.adapter_name = f"palace-etl:{origin_system}"
        self._drawers: list[dict] = []
        self._ids: set[str] = set()
        self._entities: dict[str, dict] = {}
        self._triples: list[dict] = []

    def drawer(self, *, id: str, document: str, wing: str, room: str, source_file: str, chunk_index: int,
               origin_id: str, added_by: str = "palace-etl", hall: str | None = None,
               created_at: Any = None, updated_at: Any = None, extra: dict | None = None) -> bool:
        """Add a drawer; False if this batch already holds the id (the loader dedupes across batches)."""
        if id in self._ids:
            return False
        self._ids.add(id)
        self._drawers.append({
            "id": id, "document": document, "wing": wing, "room": room, "source_file": source_file,
            "chunk_index": chunk_index, "added_by": added_by, "filed_at": None, "hall": hall,
            "origin_system": self.origin_system, "origin_id": origin_id,
            "content_sha256": ids.content_sha256(document),
            "created_at": to_utc(created_at), "updated_at": to_utc(updated_at), "extra": extra_json(extra),
        })
        return True

    def entity(self, name: str, type_: str = "unknown", properties: dict | None = None) -> None:
        eid = ids.entity_id(name)
        if eid not in self._entities:
            self._entities[eid] = {"id": eid, "name": name, "type": type_ or "unknown",
                                   "properties": orjson.dumps(properties or {}, option=orjson.OPT_SORT_KEYS).decode()}

    def triple(self, subject: str, predicate: str, obj: str, *, origin: str, valid_from: str | None = None,
               valid_to: str | None = None, confidence: float = 1.0, source_file: str | None = None,
               source_drawer_id: str | None = None) -> None:
        self._triples.append({
            "id": ids.triple_id(subject, predicate, obj, valid_from, origin), "subject": subject,
            "predicate": ids.normalize_predicate(predicate), "object": obj, "valid_from": valid_from,
            "valid_to": valid_to, "confidence": float(confidence), "source_file": source_file,
            "source_drawer_id": source_drawer_id, "adapter_name": self.adapter_name,
        })

    def full(self) -> bool:
        return len(self._drawers) >= self.batch_size or len(self._triples) >= self.batch_size

    def flush(self, final: bool = False) -> Iterator[pa.RecordBatch]:
        """Yield what is buffered: drawers, triples, and (at the end only) entities."""
        if self._drawers:
            yield pa.RecordBatch.from_pylist(self._drawers, schema=drawer_schema())
            self._drawers, self._ids = [], set()
        if final and self._entities:
            rows = list(self._entities.values())
            for i in range(0, len(rows), self.batch_size):
                yield pa.RecordBatch.from_pylist(rows[i:i + self.batch_size], schema=ENTITY_SCHEMA)
            self._entities = {}
        if self._triples:
            yield pa.RecordBatch.from_pylist(self._triples, schema=TRIPLE_SCHEMA)
            self._triples = []

"""Zep / Graphiti JSON dumps: ``{"episodes", "entities"|"nodes", "facts"|"edges"}`` (the interchange
Cognee's ZepSource reads; also as JSONL of such records or pages).

The only source with real temporal validity: an edge's ``valid_at`` -> ``valid_from`` and
``invalid_at`` -> ``valid_to``. Mapping: episodes -> drawers (wing = ``group_id`` or ``zep``, room
``episodes``); each fact's text -> a drawer in room ``facts`` and a triple (source node name,
edge name, target node name) pointing at it; entities -> KG entities (first label as type, the
summary in properties). An edge whose validity ends before it starts is quarantined: MemPalace
stores such triples but never shows them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import orjson
import pyarrow as pa

from importers.quarantine import Quarantine
from palace import ids
from palace.errors import SourceFormatError

from .base import (
    ImportOptions,
    RowBuffer,
    head,
    iso,
    json_records,
    origin_drawer_id,
    text_of,
)

ORIGIN = "zep"
KEYS = ("entities", "nodes", "episodes", "facts", "edges")


class ZepImporter:
    name = "zep"

    def detect(self, path: Path) -> bool:
        h = head(Path(path)) if Path(path).is_file() else b""
        return b'"episodes"' in h or (b'"source_node_uuid"' in h and b'"target_node_uuid"' in h)

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path)
        source = str(path.resolve())
        buf = RowBuffer(self.name, options.batch_size)
        nodes: dict[str, str] = {}  # uuid -> name
        edges: list[tuple[int, dict]] = []  # resolved at the end: nodes may follow edges in JSONL
        for key, n, rec in json_records(path, KEYS, quarantine):
            where = f"{key or 'record'} {n}"
            if not isinstance(rec, dict):
                quarantine.add(SourceFormatError(path, None, f"{where}: not a JSON object"), orjson.dumps(rec))
                continue
            kind = key or ("facts" if "source_node_uuid" in rec else "entities" if "labels" in rec else "episodes")
            if kind in ("entities", "nodes"):
                name = text_of(rec, "name")
                if not name:
                    quarantine.add(SourceFormatError(path, None, f"{where}: entity without a name"), orjson.dumps(rec))
                    continue
                nodes[str(rec.get("uuid") or name)] = name
                labels = [lb for lb in rec.get("labels") or [] if isinstance(lb, str) and lb != "Entity"]
                buf.entity(name, labels[0] if labels else "unknown",
                           {k: v for k, v in (("summary", rec.get("summary")), ("labels", labels),
                                              ("uuid", rec.get("uuid"))) if v})
            elif kind in ("facts", "edges"):
                edges.append((n, rec))
            else:
                self._episode(path, where, rec, options, buf, source, quarantine)
            if buf.full():
                yield from buf.flush()
        for n, rec in edges:
            self._fact(path, f"fact {n}", rec, nodes, options, buf, source, quarantine)
            if buf.full():
                yield from buf.flush()
        yield from buf.flush(final=True)

    def _episode(self, path, where, rec, options, buf, source, quarantine) -> None:
        text = text_of(rec, "content", "episode_body", "body")
        if not text:
            quarantine.add(SourceFormatError(path, None, f"{where}: episode without content"), orjson.dumps(rec))
            return
        wing = ids.safe_name(options.wing or rec.get("group_id") or "zep", "zep")
        origin = str(rec.get("uuid") or ids.v3_hash(text))
        try:
            buf.drawer(id=origin_drawer_id(wing, "episodes", ORIGIN, origin), document=text, wing=wing,
                       room="episodes", source_file=source, chunk_index=0, origin_id=origin,
                       created_at=rec.get("valid_at") or rec.get("created_at"), updated_at=rec.get("created_at"),
                       extra={"episode_name": rec.get("name"), "source_description": rec.get("source_description")})
        except ValueError as exc:
            quarantine.add(SourceFormatError(path, None, f"{where}: {exc}"), orjson.dumps(rec))

    def _fact(self, path, where, rec, nodes, options, buf, source, quarantine) -> None:
        s, o = nodes.get(str(rec.get("source_node_uuid"))), nodes.get(str(rec.get("target_node_uuid")))
        pred = text_of(rec, "name", "relation", "fact_type")
        if not (s and o and pred):
            quarantine.add(SourceFormatError(path, None, f"{where}: needs a name and source/target nodes that "
                                             "exist in the dump"), orjson.dumps(rec))
            return
        try:
            valid_from, valid_to = iso(rec.get("valid_at")), iso(rec.get("invalid_at") or rec.get("expired_at"))
        except ValueError as exc:
            quarantine.add(SourceFormatError(path, None, f"{where}: {exc}"), orjson.dumps(rec))
            return
        if valid_from and valid_to and valid_to < valid_from:
            quarantine.add(SourceFormatError(path, None, f"{where}: invalid_at {valid_to} is before valid_at "
                                             f"{valid_from}"), orjson.dumps(rec))
            return
        drawer = None
        if text := text_of(rec, "fact"):
            wing = ids.safe_name(options.wing or rec.get("group_id") or "zep", "zep")
            origin = str(rec.get("uuid") or ids.v3_hash(s, pred, o, valid_from))
            drawer = origin_drawer_id(wing, "facts", ORIGIN, origin)
            buf.drawer(id=drawer, document=text, wing=wing, room="facts", source_file=source, chunk_index=0,
                       origin_id=origin, created_at=rec.get("created_at") or rec.get("valid_at"),
                       updated_at=rec.get("created_at"), extra={"valid_from": valid_from, "valid_to": valid_to})
        buf.triple(s, pred, o, origin=f"{ORIGIN}:{rec.get('uuid') or ''}", valid_from=valid_from, valid_to=valid_to,
                   confidence=float(rec.get("confidence") or 1.0), source_file=source, source_drawer_id=drawer)

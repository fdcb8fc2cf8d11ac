"""The reference MCP memory server (``@modelcontextprotocol/server-memory``).

Reads ``memory.jsonl`` (and the legacy ``memory.json``, which is the same
line-delimited format) and the ``read_graph`` tool output
``{"entities": [...], "relations": [...]}``. Compatible servers write variants, all read here: no
``type`` field (an entity has ``name``/``entityType``/``observations``, a relation
``from``/``to``/``relationType``), ``_type`` instead of ``type``, ``createdAt``/``updatedAt`` as ISO
text or Unix seconds (kept as the drawers' original timestamps), extra keys such as ``version`` or
``createdBy`` (kept as metadata), relations nested in an entity, and a first line of plain text.

Mapping: one drawer per observation, text ``"<name> (<entityType>): <observation>"``,
wing ``mcp_memory`` (or ``--wing``), room = the entity type; one KG entity per
entity name (the first declared type wins, all types are kept in
``properties.entityTypes``); one triple per relation. The file has no ids and no
timestamps, so drawer ids are content ids (MemPalace's add_drawer recipe).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import orjson
import pyarrow as pa

from importers.quarantine import Quarantine
from palace import ids
from palace.errors import SourceFormatError

from .base import (
    MAX_LINE,
    ImportOptions,
    RowBuffer,
    bounded_lines,
    jsonl_lines,
    text_of,
    to_utc,
)

DEFAULT_WING = "mcp_memory"


ENTITY_KEYS = ("name", "entityType", "observations")
RELATION_KEYS = ("from", "to", "relationType")
KNOWN_KEYS = {"type", "_type", "name", "entityName", "id", "entityType", "observations", "relations", "createdAt",
              "updatedAt", "from", "to", "relationType"}


def record_kind(rec: dict) -> str | None:
    """``entity``, ``relation`` or None: from ``type`` / ``_type``, else from the keys the record has."""
    kind = rec.get("type", rec.get("_type"))
    if kind in ("entity", "relation"):
        return kind
    if kind is None:
        if sum(k in rec for k in RELATION_KEYS) >= 2 and "observations" not in rec:
            return "relation"
        if "name" in rec and ("observations" in rec or "entityType" in rec):
            return "entity"
    return None


def _header_line(f, quarantine: Quarantine) -> int:
    """Skip a first line of plain text (a title some servers write before the JSON lines)."""
    start = f.tell()
    first = f.readline(MAX_LINE + 1)
    if first.strip() and not first.lstrip().startswith((b"{", b"[")):
        quarantine.skip("header text lines")
        return 1
    f.seek(start)
    return 0


def _records(path: Path, quarantine: Quarantine) -> Iterator[tuple[int, dict]]:
    """Yield (line, record); JSONL streams line by line, a read_graph document is read whole."""
    if _is_read_graph(path):
        yield from _read_graph(path)
        return
    with open(path, "rb") as f:
        offset = _header_line(f, quarantine)
        for lineno, raw, rec in ((n + offset, r, v) for n, r, v in jsonl_lines(f, path, quarantine)):
            if not isinstance(rec, dict):
                quarantine.add(SourceFormatError(path, lineno, "not a JSON object"), raw)
                continue
            yield lineno, rec


def _is_read_graph(path: Path) -> bool:
    """A read_graph document, compact or pretty-printed, rather than JSONL records?"""
    with open(path, "rb") as f:
        first = next((raw for _, raw in bounded_lines(f) if raw is None or raw.strip()), b"")
    if first is None:  # longer than any record: JSONL's pass quarantines it
        return False
    try:
        rec = orjson.loads(first)
        return isinstance(rec, dict) and record_kind(rec) is None and bool({"entities", "relations"} & rec.keys())
    except orjson.JSONDecodeError:
        pass
    if not first.lstrip().startswith(b"{"):
        return False
    try:  # the first line is a fragment: is the whole file one JSON document?
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        return False  # JSONL with a broken first line: the caller quarantines it
    return isinstance(doc, dict) and bool({"entities", "relations"} & doc.keys())


def _read_graph(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SourceFormatError(path, None, f"invalid JSON ({exc})") from None
    if not isinstance(doc, dict) or not ({"entities", "relations"} & doc.keys()):
        raise SourceFormatError(path, None, "neither JSONL records nor a read_graph {entities, relations} object")
    for i, ent in enumerate(doc.get("entities") or []):
        yield i + 1, {"type": "entity", **ent} if isinstance(ent, dict) else ent
    for i, rel in enumerate(doc.get("relations") or []):
        yield i + 1, {"type": "relation", **rel} if isinstance(rel, dict) else rel


class McpMemoryImporter:
    name = "mcp-memory"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        try:
            with open(path, "rb") as f:
                head = f.read(65536)
        except OSError:
            return False
        lines = [ln for ln in head.split(b"\n") if ln.strip()][:2]
        if lines and not lines[0].lstrip().startswith((b"{", b"[")):
            lines = lines[1:]  # a plain-text title line first
        for first in lines[:1]:
            try:
                rec = orjson.loads(first)
                if isinstance(rec, dict) and record_kind(rec) and ("entityType" in rec or "relationType" in rec
                                                                   or "observations" in rec):
                    return True
            except orjson.JSONDecodeError:
                pass
        return b'"entityType"' in head and b'"entities"' in head and b'"relations"' in head

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path)
        source = str(path.resolve())
        wing = ids.safe_name(options.wing or DEFAULT_WING, DEFAULT_WING)
        buf = RowBuffer(self.name, options.batch_size)
        entities: dict[str, dict[str, Any]] = {}  # entity id -> {name, types}
        for lineno, rec in _records(path, quarantine):
            kind = record_kind(rec)
            if kind == "entity":
                self._entity(path, lineno, rec, wing, source, buf, entities, quarantine)
                name = text_of(rec, "name", "entityName", "id")
                for rel in rec.get("relations") or [] if name and isinstance(rec.get("relations"), list) else []:
                    if isinstance(rel, dict):  # nested in the entity: it is the "from" unless it says otherwise
                        self._relation(path, lineno, {"from": name, **rel}, source, buf, quarantine)
            elif kind == "relation":
                self._relation(path, lineno, rec, source, buf, quarantine)
            else:
                quarantine.add(SourceFormatError(path, lineno, f"unknown record type {rec.get('type', rec.get('_type'))!r} "
                                                 "(neither an entity nor a relation)"), orjson.dumps(rec))
            if buf.full():
                yield from buf.flush()
        for info in entities.values():
            props = {"entityTypes": info["types"]} if len(info["types"]) > 1 else {}
            buf.entity(info["name"], info["types"][0], props)
        yield from buf.flush(final=True)

    def _relation(self, path: Path, lineno: int, rec: dict, source: str, buf: RowBuffer,
                  quarantine: Quarantine) -> None:
        src, dst, rel = text_of(rec, "from"), text_of(rec, "to"), text_of(rec, "relationType")
        if not (src and dst and rel):
            quarantine.add(SourceFormatError(path, lineno, "relation needs from, to and relationType"),
                           orjson.dumps(rec))
            return
        buf.triple(src, rel, dst, origin=self.name, source_file=source)

    def _entity(self, path: Path, lineno: int, rec: dict, wing: str, source: str, buf: RowBuffer,
                entities: dict, quarantine: Quarantine) -> None:
        name = text_of(rec, "name", "entityName", "id")
        observations = rec.get("observations", [])
        if not name or not isinstance(observations, list):
            quarantine.add(SourceFormatError(path, lineno, "entity needs a name and an observations list"),
                           orjson.dumps(rec))
            return
        etype = text_of(rec, "entityType") or "unknown"
        info = entities.setdefault(ids.entity_id(name), {"name": name, "types": []})
        if etype not in info["types"]:
            info["types"].append(etype)
        room = ids.safe_name(etype, "unknown")
        try:
            created, updated = to_utc(rec.get("createdAt")), to_utc(rec.get("updatedAt"))
        except ValueError as exc:
            quarantine.add(SourceFormatError(path, lineno, f"entity {name!r}: {exc}"), orjson.dumps(rec))
            return
        extra = {k: v for k, v in rec.items() if k not in KNOWN_KEYS and isinstance(v, (str, int, float, bool))}
        for i, obs in enumerate(observations):
            if not isinstance(obs, str):
                quarantine.add(SourceFormatError(path, lineno, f"observation {i} of {name!r} is not a string"),
                               orjson.dumps(rec))
                continue
            if not obs.strip():
                continue
            document = f"{name} ({etype}): {obs.strip()}"
            buf.drawer(id=ids.drawer_id_from_content(wing, room, document), document=document, wing=wing,
                       room=room, source_file=source, chunk_index=i, origin_id=f"line {lineno} observation {i}",
                       added_by="palace-etl", created_at=created, updated_at=updated or created,
                       extra={**extra, "entities": name, "entity_type": etype})

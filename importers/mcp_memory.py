"""The reference MCP memory server (``@modelcontextprotocol/server-memory``).

Reads ``memory.jsonl`` (and the legacy ``memory.json``, which is the same
line-delimited format) and the ``read_graph`` tool output
``{"entities": [...], "relations": [...]}``.

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

from etl import ids
from etl.errors import SourceFormatError
from etl.runs import Quarantine

from .base import ImportOptions, RowBuffer, jsonl_lines, text_of

DEFAULT_WING = "mcp_memory"


def _records(path: Path, quarantine: Quarantine) -> Iterator[tuple[int, dict]]:
    """Yield (line, record); JSONL streams line by line, a read_graph document is read whole."""
    if _is_read_graph(path):
        yield from _read_graph(path)
        return
    with open(path, "rb") as f:
        for lineno, raw, rec in jsonl_lines(f, path, quarantine):
            if not isinstance(rec, dict):
                quarantine.add(SourceFormatError(path, lineno, "not a JSON object"), raw)
                continue
            yield lineno, rec


def _is_read_graph(path: Path) -> bool:
    """A read_graph document, compact or pretty-printed, rather than JSONL records?"""
    with open(path, "rb") as f:
        first = next((raw for raw in f if raw.strip()), b"")
    try:
        rec = orjson.loads(first)
        return isinstance(rec, dict) and "type" not in rec and bool({"entities", "relations"} & rec.keys())
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
        first = head.lstrip().split(b"\n", 1)[0]
        try:
            rec = orjson.loads(first)
            if isinstance(rec, dict) and rec.get("type") in ("entity", "relation") and (
                    "entityType" in rec or "relationType" in rec):
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
            kind = rec.get("type")
            if kind == "entity":
                self._entity(path, lineno, rec, wing, source, buf, entities, quarantine)
            elif kind == "relation":
                src, dst, rel = text_of(rec, "from"), text_of(rec, "to"), text_of(rec, "relationType")
                if not (src and dst and rel):
                    quarantine.add(SourceFormatError(path, lineno, "relation needs from, to and relationType"),
                                   orjson.dumps(rec))
                    continue
                buf.triple(src, rel, dst, origin=self.name, source_file=source)
            else:
                quarantine.add(SourceFormatError(path, lineno, f"unknown record type {kind!r}"), orjson.dumps(rec))
            if buf.full():
                yield from buf.flush()
        for info in entities.values():
            props = {"entityTypes": info["types"]} if len(info["types"]) > 1 else {}
            buf.entity(info["name"], info["types"][0], props)
        yield from buf.flush(final=True)

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
                       added_by="palace-etl", extra={"entities": name, "entity_type": etype})

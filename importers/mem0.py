"""mem0: the OSS ``get_all`` / Platform JSON, the OSS ``history.db``, and OpenMemory's export zip.

- JSON: ``{"results": [...]}`` (Platform pages carry ``count/next``), a bare list, or JSONL of
  records or pages; streamed. Graph-memory ``relations`` ``{source, relationship, destination}``
  become triples.
- ``history.db`` (SQLite): current memories rebuilt from each ``memory_id``'s last event, unless
  that event is a DELETE.
- OpenMemory ``memories_export_<user>.zip``: ``memories.jsonl.gz`` (or ``memories.json``);
  ``deleted`` memories are skipped.

Mapping: text = ``memory | data | content``; wing = ``--wing`` or user / agent / app; room = the
first category (else ``metadata.type``, else ``general``); drawer ids come from the mem0 id, so
an updated memory re-imports onto its drawer.
"""
from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path
from typing import Any, Iterator

import ijson
import orjson
import pyarrow as pa

from importers.quarantine import Quarantine
from palace import ids
from palace.errors import SourceFormatError

from .base import (
    ImportOptions,
    RowBuffer,
    check_json_depth,
    head,
    is_sqlite,
    json_records,
    jsonl_lines,
    origin_drawer_id,
    sqlite_ro,
    sqlite_tables,
    text_of,
)

ORIGIN = "mem0"
TEXT_KEYS = ("memory", "data", "content", "text")


class Mem0Importer:
    name = "mem0"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        if is_sqlite(path):
            tables = sqlite_tables(path)
            return "history" in tables and "memories" not in tables
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return bool({"memories.jsonl.gz", "memories.json"} & {Path(n).name for n in z.namelist()})
        h = head(path)
        return b'"memory"' in h and (b'"user_id"' in h or b'"agent_id"' in h or b'"results"' in h)

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path)
        source = str(path.resolve())
        buf = RowBuffer(self.name, options.batch_size)
        if is_sqlite(path):
            records = _history(path)
        elif zipfile.is_zipfile(path):
            records = _openmemory(path, quarantine)
        else:
            records = ((f"record {n}" if k != "relations" else "relation", k, n, r)
                       for k, n, r in json_records(path, ("results", "memories", "relations"), quarantine))
        for where, key, n, rec in records:
            if not isinstance(rec, dict):
                quarantine.add(SourceFormatError(path, None, f"{key or 'array'} {where}: not a JSON object"),
                               orjson.dumps(rec))
                continue
            if str(rec.get("state") or "").lower() == "deleted":
                quarantine.skip("deleted memories")
                continue
            try:
                if key == "relations":
                    _relation(rec, buf, source)
                else:
                    _memory(rec, options, buf, source, n)
            except (ValueError, TypeError) as exc:
                quarantine.add(SourceFormatError(path, None, f"{key or 'array'} {where}: {exc}"),
                               orjson.dumps(rec, default=str))
            if buf.full():
                yield from buf.flush()
        yield from buf.flush(final=True)


def _memory(rec: dict, options: ImportOptions, buf: RowBuffer, source: str, n: int) -> None:
    text = text_of(rec, *TEXT_KEYS)
    if text is None:
        raise ValueError(f"no memory text (one of {', '.join(TEXT_KEYS)})")
    meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    cats = rec.get("categories") or []
    cats = [c for c in (cats if isinstance(cats, list) else [cats]) if isinstance(c, str) and c.strip()]
    app = rec.get("app") if isinstance(rec.get("app"), str) else rec.get("app_id")
    wing = ids.safe_name(options.wing or rec.get("user_id") or rec.get("agent_id") or app or "mem0", "mem0")
    room = ids.safe_name(cats[0] if cats else meta.get("type") or "general", "general")
    origin = str(rec.get("id") or rec.get("hash") or "")
    did = origin_drawer_id(wing, room, ORIGIN, origin) if origin else ids.drawer_id_from_content(wing, room, text)
    extra = {f"meta_{k}": v for k, v in meta.items()}
    extra.update({k: rec[k] for k in ("user_id", "agent_id", "run_id", "actor_id", "role", "hash", "state")
                  if isinstance(rec.get(k), str) and rec[k]})
    if app:
        extra["app"] = str(app)
    if cats:
        extra["categories"] = ";".join(cats)
    buf.drawer(id=did, document=text, wing=wing, room=room, source_file=source, chunk_index=0,
               origin_id=origin or f"record {n}", created_at=rec.get("created_at"),
               updated_at=rec.get("updated_at") or rec.get("created_at"), extra=extra)


def _relation(rec: dict, buf: RowBuffer, source: str) -> None:
    s, p, o = text_of(rec, "source"), text_of(rec, "relationship", "relation"), text_of(rec, "destination", "target")
    if not (s and p and o):
        raise ValueError("relation needs source, relationship and destination")
    buf.entity(s, str(rec.get("source_type") or "unknown"))
    buf.entity(o, str(rec.get("destination_type") or "unknown"))
    buf.triple(s, p, o, origin=ORIGIN, source_file=source)


def _history(path: Path) -> Iterator[tuple[str, str, int, dict]]:
    """Each memory's last event in history.db, unless it deleted the memory."""
    conn = sqlite_ro(path)
    try:
        rows = conn.execute(
            "SELECT memory_id, new_memory, event, created_at, updated_at, is_deleted, actor_id, role FROM ("
            " SELECT *, row_number() OVER (PARTITION BY memory_id ORDER BY coalesce(updated_at, created_at) DESC,"
            " rowid DESC) AS k FROM history) WHERE k = 1 ORDER BY memory_id")
        first: dict[str, Any] = {r[0]: r[1] for r in conn.execute(
            "SELECT memory_id, min(created_at) FROM history GROUP BY memory_id")}
        for n, r in enumerate(rows, 1):
            if str(r["event"]).upper() == "DELETE" or r["is_deleted"]:
                yield f"memory_id {r['memory_id']}", "history", n, {"state": "deleted"}
                continue
            yield f"memory_id {r['memory_id']}", "history", n, {
                "id": r["memory_id"], "memory": r["new_memory"], "created_at": first.get(r["memory_id"]),
                "updated_at": r["updated_at"] or r["created_at"], "actor_id": r["actor_id"], "role": r["role"]}
    finally:
        conn.close()


def _openmemory(path: Path, quarantine: Quarantine) -> Iterator[tuple[str, str, int, dict]]:
    with zipfile.ZipFile(path) as z:
        names = {Path(n).name: n for n in z.namelist()}
        if not {"memories.jsonl.gz", "memories.json"} & names.keys():
            raise SourceFormatError(path, None, "the zip holds neither memories.jsonl.gz nor memories.json "
                                    "(not an OpenMemory export)")
        if "memories.jsonl.gz" in names:
            with z.open(names["memories.jsonl.gz"]) as raw, gzip.open(raw) as f:
                for lineno, _, rec in jsonl_lines(f, f"{path}!memories.jsonl.gz", quarantine):
                    yield f"line {lineno}", "memories", lineno, rec
            return
        check_json_depth(path, lambda: z.open(names["memories.json"]))
        with z.open(names["memories.json"]) as f:
            apps = {a.get("id"): a.get("name") for a in ijson.items(f, "apps.item") if isinstance(a, dict)}
        with z.open(names["memories.json"]) as f:
            for n, rec in enumerate(ijson.items(io.BufferedReader(f), "memories.item", use_float=True), 1):
                if isinstance(rec, dict) and rec.get("app_id") in apps:
                    rec = {**rec, "app": apps[rec["app_id"]]}
                yield f"record {n}", "memories", n, rec

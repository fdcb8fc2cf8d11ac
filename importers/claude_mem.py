"""claude-mem (thedotmack): its SQLite database ``~/.claude-mem/claude-mem.db`` (read-only, WAL-safe)
or its JSON export envelope (``scripts/export-memories.ts``: observations, sessions, summaries).

- Observations -> drawers: ``title``, ``subtitle``, the ``narrative`` and its ``facts`` as a list;
  wing = ``project`` (or ``--wing``); room = ``type`` (decision, bugfix, feature, refactor,
  discovery, change); hall ``discoveries``; timestamps from ``created_at_epoch`` (ms).
- Session summaries -> drawers in room ``session-summary`` (hall ``events``): request,
  investigated, learned, completed, next steps, notes.
- Triples: (observation title, ``modified``, file) for ``files_modified``, and (project,
  ``concerns``, concept) for ``concepts``.
- Active ``directives`` (durable user rules) -> drawers in room ``directives``.
- User prompts and session rows are skipped and counted (the transcripts hold the prompts); its
  Chroma vectors are one per field, so drawers are embedded afresh.
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

ORIGIN = "claude-mem"
SUMMARY_PARTS = (("request", "Request"), ("investigated", "Investigated"), ("learned", "Learned"),
                 ("completed", "Completed"), ("next_steps", "Next steps"), ("notes", "Notes"))
KEYS = ("observations", "summaries", "directives", "sessions", "prompts")


def _list(value: Any) -> list[str]:
    """A JSON-text (or real) list column as strings."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value) if value.strip().startswith("[") else [value]
        except orjson.JSONDecodeError:
            value = [value]
    return [str(v).strip() for v in value or [] if str(v).strip()]


class ClaudeMemImporter:
    name = "claude-mem"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        if is_sqlite(path):
            return {"observations", "session_summaries"} <= sqlite_tables(path)
        h = head(path, 4096)
        return b'"totalObservations"' in h or (b'"observations"' in h and b'"memory_session_id"' in head(path))

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path)
        source = str(path.resolve())
        buf = RowBuffer(self.name, options.batch_size)
        records = _database(path) if is_sqlite(path) else _export(path, quarantine)
        for kind, where, rec in records:
            if kind in ("sessions", "prompts"):  # a database gives their count, an export the records
                quarantine.skip(f"claude-mem {kind} (not memories)", rec if where == "count" else 1)
                continue
            try:
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                if kind == "summaries":
                    self._summary(rec, options, buf, source)
                elif kind == "directives":
                    self._directive(rec, options, buf, source, quarantine)
                else:
                    self._observation(rec, options, buf, source)
            except (ValueError, TypeError) as exc:
                quarantine.add(SourceFormatError(path, None, f"{where}: {exc}"), orjson.dumps(rec, default=str))
            if buf.full():
                yield from buf.flush()
        yield from buf.flush(final=True)

    def _observation(self, rec: dict, options: ImportOptions, buf: RowBuffer, source: str) -> None:
        title, subtitle = (str(rec.get(k) or "").strip() for k in ("title", "subtitle"))
        facts = _list(rec.get("facts"))
        body = str(rec.get("narrative") or rec.get("text") or "").strip()
        head_ = "\n".join(p for p in (title, subtitle) if p)
        text = "\n\n".join(p for p in (head_, body, "\n".join(f"- {f}" for f in facts)) if p)
        if not text:
            raise ValueError("observation without title, narrative, text or facts")
        project = str(rec.get("project") or "claude_mem")
        wing = ids.safe_name(options.wing or project, "claude_mem")
        room = ids.safe_name(rec.get("type") or "observation", "observation")
        key = f"obs:{rec.get('id') if rec.get('id') is not None else ids.v3_hash(text)}"
        drawer = origin_drawer_id(wing, room, ORIGIN, key)
        buf.drawer(id=drawer, document=text, wing=wing, room=room, hall="discoveries", source_file=source,
                   chunk_index=0, origin_id=key, created_at=rec.get("created_at_epoch") or rec.get("created_at"),
                   updated_at=rec.get("created_at_epoch") or rec.get("created_at"),
                   extra={"title": title, "memory_session_id": rec.get("memory_session_id"), "project": project,
                          "concepts": ";".join(_list(rec.get("concepts"))),
                          "files_modified": ";".join(_list(rec.get("files_modified"))),
                          "prompt_number": rec.get("prompt_number")})
        subject = title or key
        for f in _list(rec.get("files_modified")):
            buf.triple(subject, "modified", f, origin=f"{ORIGIN}:{key}", source_file=source, source_drawer_id=drawer)
        for concept in _list(rec.get("concepts")):
            buf.triple(project, "concerns", concept, origin=f"{ORIGIN}:{key}", source_file=source,
                       source_drawer_id=drawer)

    def _summary(self, rec: dict, options: ImportOptions, buf: RowBuffer, source: str) -> None:
        text = "\n".join(f"{label}: {str(rec[k]).strip()}" for k, label in SUMMARY_PARTS
                         if rec.get(k) and str(rec[k]).strip())
        if not text:
            raise ValueError("session summary with nothing in it")
        wing = ids.safe_name(options.wing or rec.get("project") or "claude_mem", "claude_mem")
        key = f"summary:{rec.get('id') if rec.get('id') is not None else rec.get('memory_session_id')}"
        buf.drawer(id=origin_drawer_id(wing, "session-summary", ORIGIN, key), document=text, wing=wing,
                   room="session-summary", hall="events", source_file=source, chunk_index=0, origin_id=key,
                   created_at=rec.get("created_at_epoch") or rec.get("created_at"),
                   updated_at=rec.get("created_at_epoch") or rec.get("created_at"),
                   extra={"memory_session_id": rec.get("memory_session_id"), "prompt_number": rec.get("prompt_number")})


    def _directive(self, rec: dict, options: ImportOptions, buf: RowBuffer, source: str, quarantine) -> None:
        if (rec.get("status") or "active") != "active":
            quarantine.skip("claude-mem directives that are not active")
            return
        text = str(rec.get("content") or "").strip()
        if not text:
            raise ValueError("directive without content")
        wing = ids.safe_name(options.wing or rec.get("project") or "claude_mem", "claude_mem")
        key = f"directive:{rec.get('id') if rec.get('id') is not None else ids.v3_hash(text)}"
        buf.drawer(id=origin_drawer_id(wing, "directives", ORIGIN, key), document=text, wing=wing, room="directives",
                   source_file=source, chunk_index=0, origin_id=key,
                   created_at=rec.get("created_at_epoch") or rec.get("created_at"),
                   updated_at=rec.get("updated_at_epoch") or rec.get("created_at_epoch"),
                   extra={"scope": rec.get("scope"), "directive_source": rec.get("source")})


def _export(path: Path, quarantine: Quarantine) -> Iterator[tuple[str, str, Any]]:
    for key, n, rec in json_records(path, KEYS, quarantine):
        kind = key or "observations"
        yield kind, f"{kind} {n}", rec


def _database(path: Path) -> Iterator[tuple[str, str, Any]]:
    conn = sqlite_ro(path)
    try:
        tables = tables_of(conn)
        for table, kind in (("observations", "observations"), ("session_summaries", "summaries"),
                            ("directives", "directives")):
            if table in tables:
                for r in conn.execute(f"SELECT * FROM {table} ORDER BY id"):
                    yield kind, f"{table} row id {r['id']}", dict(r)
        for table, kind in (("sdk_sessions", "sessions"), ("user_prompts", "prompts")):
            if table in tables:
                yield kind, "count", conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()

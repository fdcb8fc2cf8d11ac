"""Claude.ai data export: ``conversations.json`` (or ``.jsonl``), ``memories.json`` /
``memories/<uuid>.json`` and ``projects.json`` / ``projects/<uuid>.json``; PATH is a file or the
unpacked export directory.

Mapping (wing ``claude_ai`` or ``--wing``): one drawer per exchange in room ``conversations``
(messages' ``text``, else their ``text`` content blocks; thinking and tool blocks are left out);
the account memory (``conversations_memory``) in room ``claude_memory``, each project memory in
room ``project_memory``, memory files in room ``memory_files``; project documents in room
``project_docs``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import orjson
import pyarrow as pa

from etl import ids
from etl.errors import SourceFormatError
from etl.runs import Quarantine

from .base import (
    Exchanges,
    ImportOptions,
    RowBuffer,
    files_under,
    head,
    json_records,
    origin_drawer_id,
    text_of,
)

ORIGIN = "claude-ai"


def _message_text(m: dict) -> str:
    if isinstance(m.get("text"), str) and m["text"].strip():
        return m["text"]
    return "\n".join(b.get("text") or "" for b in m.get("content") or []
                     if isinstance(b, dict) and b.get("type") == "text").strip()


class ClaudeAIImporter:
    name = "claude-ai"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if path.is_dir():
            return any(b'"chat_messages"' in head(p) for p in path.glob("conversations*.json*")) or (
                path / "memories.json").exists() or (path / "memories").is_dir()
        h = head(path) if path.is_file() else b""
        return b'"chat_messages"' in h or b'"conversations_memory"' in h or (
            b'"prompt_template"' in h and b'"docs"' in h)

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        buf = RowBuffer(self.name, options.batch_size)
        wing = ids.safe_name(options.wing or "claude_ai", "claude_ai")
        for f in files_under(Path(path), (".json", ".jsonl")):
            source = str(f.resolve())
            for key, n, rec in json_records(f, ("conversations", "memories", "projects"), quarantine):
                where = f"{key or 'record'} {n}"
                if not isinstance(rec, dict):
                    quarantine.add(SourceFormatError(f, None, f"{where}: not a JSON object"), orjson.dumps(rec))
                elif "chat_messages" in rec:
                    self._conversation(rec, wing, source, buf)
                elif {"conversations_memory", "project_memories", "memory_files"} & rec.keys():
                    self._memory(rec, wing, source, buf)
                elif "docs" in rec or "prompt_template" in rec:
                    self._project(rec, wing, source, buf)
                else:
                    quarantine.add(SourceFormatError(f, None, f"{where}: neither a conversation, a memory nor a "
                                                     "project"), orjson.dumps(rec)[:10000])
                if buf.full():
                    yield from buf.flush()
        yield from buf.flush(final=True)

    def _conversation(self, conv: dict, wing: str, source: str, buf: RowBuffer) -> None:
        cid = str(conv.get("uuid") or "")
        talk = Exchanges(buf, wing=wing, origin=ORIGIN, source=source,
                         extra={"title": conv.get("name") or "", "conversation_id": cid})
        for m in conv.get("chat_messages") or []:
            if not isinstance(m, dict):
                continue
            text, at = _message_text(m), m.get("created_at")
            if m.get("sender") == "human" and text:
                talk.user(text, f"{cid}:{m.get('uuid')}", at)
            elif text:
                talk.reply(text, at)
        talk.close()

    def _memory(self, rec: dict, wing: str, source: str, buf: RowBuffer) -> None:
        account = str(rec.get("account_uuid") or "")
        items = [("claude_memory", f"{account}:conversations_memory", rec.get("conversations_memory"), None)]
        items += [("project_memory", f"{account}:project:{p}", text, None)
                  for p, text in (rec.get("project_memories") or {}).items()]
        items += [("memory_files", f"{account}:file:{m.get('path')}", m.get("content"), m.get("updated_at"))
                  for m in rec.get("memory_files") or [] if isinstance(m, dict)]
        for room, key, text, at in items:
            if isinstance(text, str) and text.strip():
                buf.drawer(id=origin_drawer_id(wing, room, ORIGIN, key), document=text.strip(), wing=wing,
                           room=room, source_file=source, chunk_index=0, origin_id=key, updated_at=at)

    def _project(self, rec: dict, wing: str, source: str, buf: RowBuffer) -> None:
        name = text_of(rec, "name") or str(rec.get("uuid"))
        for k, doc in enumerate(rec.get("docs") or []):
            if isinstance(doc, dict) and isinstance(doc.get("content"), str) and doc["content"].strip():
                key = f"{rec.get('uuid')}:doc:{doc.get('uuid') or k}"
                buf.drawer(id=origin_drawer_id(wing, "project_docs", ORIGIN, key), document=doc["content"],
                           wing=wing, room="project_docs", source_file=source, chunk_index=k, origin_id=key,
                           created_at=doc.get("created_at"), extra={"project": name, "filename": doc.get("filename")})

"""Claude.ai data export: ``conversations.json`` (or ``.jsonl``), ``memories.json`` /
``memories/<uuid>.json`` and ``projects.json`` / ``projects/<uuid>.json``; PATH is a file or the
unpacked export directory.

Mapping (wing ``claude_ai`` or ``--wing``): one drawer per exchange in room ``conversations``
(messages' ``text``, else their ``text`` content blocks; thinking and tool blocks are left out);
the account memory (``conversations_memory``) in room ``claude_memory``, each project memory in
room ``project_memory``, memory files in room ``memory_files``; project documents in room
``project_docs`` and a project's instructions (``prompt_template``) in room ``project_instructions``
(a project with no name and no content is skipped). Conversations branch through
``parent_message_uuid`` with no leaf pointer: the branch that ends at the latest leaf is the one
imported.
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


def visible_branch(messages: list[dict]) -> list[dict]:
    """The messages of the branch that ends at the latest leaf, oldest first. Without
    ``parent_message_uuid`` links (older exports) the list is one linear thread as it stands."""
    by_id = {m.get("uuid"): m for m in messages if m.get("uuid")}
    if not any(m.get("parent_message_uuid") in by_id for m in messages):
        return messages
    parents = {m.get("parent_message_uuid") for m in messages}
    leaves = [m for m in messages if m.get("uuid") not in parents]
    node = max(enumerate(leaves), key=lambda km: (str(km[1].get("created_at") or ""), km[0]))[1] if leaves else None
    out, seen = [], set()
    while node is not None and node.get("uuid") not in seen:
        seen.add(node.get("uuid"))
        out.append(node)
        node = by_id.get(node.get("parent_message_uuid"))
    return out[::-1]


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
                    self._project(rec, wing, source, buf, quarantine)
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
        for m in visible_branch([m for m in conv.get("chat_messages") or [] if isinstance(m, dict)]):
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

    def _project(self, rec: dict, wing: str, source: str, buf: RowBuffer, quarantine: Quarantine) -> None:
        name = text_of(rec, "name")
        docs = [d for d in rec.get("docs") or [] if isinstance(d, dict) and isinstance(d.get("content"), str)
                and d["content"].strip()]
        instructions = text_of(rec, "prompt_template")
        if not (name or docs or instructions):
            quarantine.skip("empty projects (no name, no instructions, no documents)")
            return
        name = name or str(rec.get("uuid"))
        if instructions:
            key = f"{rec.get('uuid')}:prompt_template"
            buf.drawer(id=origin_drawer_id(wing, "project_instructions", ORIGIN, key), document=instructions,
                       wing=wing, room="project_instructions", source_file=source, chunk_index=0, origin_id=key,
                       created_at=rec.get("created_at"), updated_at=rec.get("updated_at"), extra={"project": name})
        for k, doc in enumerate(rec.get("docs") or []):
            if isinstance(doc, dict) and isinstance(doc.get("content"), str) and doc["content"].strip():
                key = f"{rec.get('uuid')}:doc:{doc.get('uuid') or k}"
                buf.drawer(id=origin_drawer_id(wing, "project_docs", ORIGIN, key), document=doc["content"],
                           wing=wing, room="project_docs", source_file=source, chunk_index=k, origin_id=key,
                           created_at=doc.get("created_at"), extra={"project": name, "filename": doc.get("filename")})

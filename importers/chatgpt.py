"""ChatGPT data export: ``conversations.json`` (array or object shape, or split
``conversations-NNN.json`` files in a directory), with the ``mapping`` tree.

The visible thread is walked up from ``current_node`` (without one, from the newest leaf), so
regenerated answers on other branches are left out. Mapping: one drawer per exchange, wing
``chatgpt`` (or ``--wing``), room ``conversations``; assistant messages addressed to the ``bio``
tool are the saved memories ChatGPT wrote: each becomes a drawer in room ``memory``. System
messages, tool traffic, reasoning and custom-instruction context are skipped and counted.
"""
from __future__ import annotations

import re
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
)

ORIGIN = "chatgpt"
TEXT_TYPES = ("text", "multimodal_text", "code")


def _when(node: dict) -> float:
    t = (node.get("message") or {}).get("create_time") if isinstance(node, dict) else None
    return float(t) if isinstance(t, (int, float)) else 0.0


def _thread(mapping: dict, current: str | None) -> list[dict]:
    """The messages of the visible branch, oldest first. ``current_node`` is not always a leaf: from
    it, the branch goes on down through the newest child to a leaf."""
    if current not in mapping:
        leaves = [n for n in mapping.values() if isinstance(n, dict) and not n.get("children")]
        current = max(leaves, key=_when, default={}).get("id")
    down = set()
    while current in mapping and current not in down and (mapping[current].get("children") or []):
        down.add(current)
        kids = [mapping[c] for c in mapping[current]["children"] if isinstance(mapping.get(c), dict)]
        if not kids:
            break
        current = max(kids, key=_when).get("id")
    out, seen = [], set()
    while current in mapping and current not in seen:
        seen.add(current)
        node = mapping[current]
        if node.get("message"):
            out.append(node["message"])
        current = node.get("parent")
    return out[::-1]


def _text(message: dict) -> str:
    content = message.get("content") or {}
    if content.get("content_type") not in TEXT_TYPES:
        return ""
    if isinstance(content.get("text"), str):
        return content["text"]
    return "\n".join(p for p in content.get("parts") or [] if isinstance(p, str)).strip()


class ChatGPTImporter:
    name = "chatgpt"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if path.is_dir():
            return any(path.glob("conversations*.json")) and (path / "chat.html").exists() or any(
                b'"mapping"' in head(p) for p in path.glob("conversations*.json"))
        h = head(path) if path.is_file() else b""
        return b'"mapping"' in h and (b'"author"' in h or b'"children"' in h)

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path)
        files = [f for f in files_under(path, (".json",)) if path.is_file() or re.match(r"conversations", f.name)]
        buf = RowBuffer(self.name, options.batch_size)
        wing = ids.safe_name(options.wing or "chatgpt", "chatgpt")
        for f in files:
            source = str(f.resolve())
            if head(f, 4096).lstrip()[:1] == b"{":  # object shape: one conversation, or {"conversations": [...]}
                try:
                    doc = orjson.loads(f.read_bytes())
                except orjson.JSONDecodeError as exc:
                    raise SourceFormatError(f, None, f"invalid JSON ({exc})") from None
                convs = enumerate(doc.get("conversations") or [doc] if "mapping" in doc or "conversations" in doc
                                  else list(doc.values()), 1)
            else:
                convs = ((n, c) for _, n, c in json_records(f, (), quarantine))
            for n, conv in convs:
                if not isinstance(conv, dict):
                    quarantine.add(SourceFormatError(f, None, f"conversation {n}: not a JSON object"),
                                   orjson.dumps(conv, default=str)[:10000])
                    continue
                if conv.get("mapping") is None:  # an empty conversation, not a broken record
                    quarantine.skip("conversations without a mapping tree (empty)")
                    continue
                if not isinstance(conv["mapping"], dict):
                    quarantine.add(SourceFormatError(f, None, f"conversation {n}: mapping is not an object"),
                                   orjson.dumps(conv, default=str)[:10000])
                    continue
                self._conversation(conv, wing, source, buf, quarantine)
                if buf.full():
                    yield from buf.flush()
        yield from buf.flush(final=True)

    def _conversation(self, conv: dict, wing: str, source: str, buf: RowBuffer, quarantine: Quarantine) -> None:
        cid = str(conv.get("id") or conv.get("conversation_id") or "")
        title = conv.get("title") or ""
        talk = Exchanges(buf, wing=wing, origin=ORIGIN, source=source, extra={"title": title, "conversation_id": cid})
        for m in _thread(conv["mapping"], conv.get("current_node")):
            role, text, at = (m.get("author") or {}).get("role"), _text(m), m.get("create_time")
            if role == "assistant" and m.get("recipient") == "bio":
                if text:
                    key = f"{cid}:bio:{m.get('id')}"
                    buf.drawer(id=origin_drawer_id(wing, "memory", ORIGIN, key), document=text, wing=wing,
                               room="memory", source_file=source, chunk_index=0, origin_id=key, created_at=at,
                               updated_at=at, extra={"conversation_id": cid})
            elif role == "user" and text:
                talk.user(text, f"{cid}:{m.get('id')}", at)
            elif role == "assistant" and text and (m.get("recipient") in (None, "all")):
                talk.reply(text, at)
            else:
                quarantine.skip(f"{role or 'unknown'} messages without visible text")
        talk.close()

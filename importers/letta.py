"""Letta / MemGPT Agent Files (``.af``): the v1 single-agent layout, the v2 ``AgentFileSchema``,
and files double-encoded as one JSON string.

Mapping: wing = agent name (or ``--wing``); each core-memory block is a drawer, room = its label;
messages become transcripts, one drawer per exchange (a user turn and the replies that follow it)
in room ``conversations``. Letta wraps user turns in JSON (``user_message``) and replies in
``send_message`` (or another ``send_message*`` messaging tool) calls: both are unwrapped.
"User" messages that are harness text -- heartbeats, login and system alerts, ``<system-reminder>``
wrappers, the transcripts a sleeptime agent is handed to review -- are skipped and counted by kind,
as are tool results and tool definitions. Two agents may each hold a block with the same label:
both are kept. Archival passages are not in agent files.
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

from .base import Exchanges, ImportOptions, RowBuffer, head, origin_drawer_id, text_of

ORIGIN = "letta"
ROOM_CONVERSATIONS = "conversations"
SYSTEM_REMINDER = re.compile(r"<system-reminder>.*?(?:</system-reminder>|\Z)", re.S | re.I)
SLEEPTIME = re.compile(r"you are a sleep-?time (?:memory )?agent", re.I)


def _load(path: Path) -> dict:
    """An agent file is one JSON document (KB-MB); a double-encoded one is a JSON string holding it."""
    data = path.read_bytes()
    if not data.strip():
        return {"agents": []}  # empty input is not an error
    try:
        doc = orjson.loads(data)
        if isinstance(doc, str):
            doc = orjson.loads(doc)
    except orjson.JSONDecodeError as exc:
        raise SourceFormatError(path, None, f"invalid JSON ({exc})") from None
    if not isinstance(doc, dict) or not ("agents" in doc or "core_memory" in doc):
        raise SourceFormatError(path, None, "not a Letta agent file (no agents, no core_memory)")
    return doc


def _agents(doc: dict) -> Iterator[tuple[dict, list[dict]]]:
    """(agent, its blocks) for both schema versions."""
    if "core_memory" in doc:  # v1: one agent, blocks inline
        yield doc, [b for b in doc.get("core_memory") or [] if isinstance(b, dict)]
        return
    blocks = {b.get("id"): b for b in doc.get("blocks") or [] if isinstance(b, dict)}
    for agent in doc.get("agents") or []:
        if isinstance(agent, dict):
            yield agent, [blocks[i] for i in agent.get("block_ids") or [] if i in blocks]


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(c.get("text", "") for c in content or [] if isinstance(c, dict) and c.get("type") == "text")


def _user_turn(message: dict) -> tuple[str | None, str | None]:
    """(the user's words, None) or (None, the kind of harness text it is instead)."""
    text = _text(message).strip()
    try:
        wrapped = orjson.loads(text)
    except orjson.JSONDecodeError:
        wrapped = None
    if isinstance(wrapped, dict) and "type" in wrapped:
        if wrapped.get("type") != "user_message":
            return None, "heartbeats and system events"
        text = str(wrapped.get("message") or "").strip()
    if SLEEPTIME.search(text[:2000]):
        return None, "sleeptime agent transcripts"
    words = SYSTEM_REMINDER.sub("", text).strip()
    if not words:
        return None, "system-reminder harness messages" if text else "empty user messages"
    return words, None


def _replies(message: dict) -> list[str]:
    """What the assistant said: send_message arguments (else its plain text content)."""
    said = []
    for call in message.get("tool_calls") or []:
        fn = (call or {}).get("function") or {}
        if str(fn.get("name") or "").startswith("send_message"):  # send_message and the other messaging tools
            try:
                said.append(orjson.loads(fn.get("arguments") or "{}").get("message", ""))
            except (orjson.JSONDecodeError, AttributeError):
                continue
    if not said and not message.get("tool_calls"):
        said.append(_text(message))
    return [s.strip() for s in said if isinstance(s, str) and s.strip()]


class LettaImporter:
    name = "letta"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        h = head(path)
        return path.suffix == ".af" or (b"core_memory" in h and b"agent_type" in h) or (
            b'"agents"' in h and b'"blocks"' in h) or (h.startswith(b'"{') and b"agent" in h)

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        path = Path(path)
        source = str(path.resolve())
        doc = _load(path)
        buf = RowBuffer(self.name, options.batch_size)
        quarantine.skip("tool definitions", len(doc.get("tools") or []))
        keys: dict[str, str] = {}  # block key -> its content (two agents may share a name and a label)
        for agent, blocks in _agents(doc):
            name = text_of(agent, "name") or "letta_agent"
            wing = ids.safe_name(options.wing or name, "letta")
            for k, block in enumerate(blocks):
                label, value = text_of(block, "label"), block.get("value")
                if not label or not isinstance(value, str):
                    quarantine.add(SourceFormatError(path, None, f"agent {name!r} block {k}: needs a label and a "
                                                     "string value"), orjson.dumps(block))
                    continue
                if not value.strip():
                    quarantine.skip("empty memory blocks")
                    continue
                room = ids.safe_name(label.strip("/"), "core_memory")
                key = f"{name}:block:{label}"
                if keys.get(key, value) != value:  # another agent's block under the same name and label
                    key = f"{name}:block:{label}:{block.get('id') or agent.get('id') or k}"
                keys.setdefault(key, value)
                buf.drawer(id=origin_drawer_id(wing, room, ORIGIN, key), document=value,
                           wing=wing, room=room, source_file=source, chunk_index=k,
                           origin_id=key, created_at=block.get("created_at"),
                           updated_at=block.get("updated_at"), extra={"agent": name, "block_label": label,
                                                                       "block_limit": block.get("limit")})
            self._exchanges(agent, name, wing, source, buf, quarantine)
            buf.entity(name, "agent", {"agent_type": agent.get("agent_type")})
        yield from buf.flush(final=True)

    def _exchanges(self, agent: dict, name: str, wing: str, source: str, buf: RowBuffer,
                   quarantine: Quarantine) -> None:
        messages = sorted((m for m in agent.get("messages") or [] if isinstance(m, dict)),
                          key=lambda m: str(m.get("created_at") or ""))  # files are not in time order
        talk = Exchanges(buf, wing=wing, origin=ORIGIN, source=source, room=ROOM_CONVERSATIONS,
                         extra={"agent": name})
        for m in messages:
            role, at = m.get("role"), str(m.get("created_at") or "")
            if role == "user":
                words, harness = _user_turn(m)
                if words is None:
                    quarantine.skip(harness)
                    continue
                talk.user(words, f"{name}:exchange:{at}", at or None)
            elif role == "assistant" and talk.turn is not None:
                for reply in _replies(m):
                    talk.reply(reply, at or None)
            else:
                quarantine.skip(f"{role} messages")
        talk.close()

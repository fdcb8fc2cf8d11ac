"""Claude Code's own memory: ``CLAUDE.md`` files, auto-memory topic files (``memory/*.md``, both
frontmatter dialects, and ``MEMORY.md``) and session transcripts (``<session>.jsonl``).

PATH is one file or a directory (e.g. ``~/.claude/projects``), walked for ``.md`` and ``.jsonl``.

- Markdown: one drawer per file, verbatim body; room = the memory ``type`` (``metadata.type`` or a
  top-level ``type``, else a ``feedback_``/``project_``/``user_``/``reference_`` file-name prefix),
  ``instructions`` for CLAUDE.md, ``memory_index`` for MEMORY.md; ``[[links]]`` and MEMORY.md's
  ``[title](file.md)`` entries become ``links_to`` triples.
- Transcripts: one drawer per exchange (a user prompt and the assistant text that answers it),
  room ``conversations``, wing = the project directory (the ``cwd`` basename). Only the visible
  branch is read: from the last message back through ``parentUuid`` (and across a compaction
  boundary through ``logicalParentUuid``), so a rewound branch (Esc-Esc, then another try) is left
  out and no prompt is lost where parallel tool calls fork the chain. Tool calls and results,
  sidechains, summaries, compaction summaries, progress records and repeated uuids are skipped and
  counted; ``<system-reminder>`` and other harness tags and ANSI escape codes are stripped; the
  streamed lines of one assistant message are one reply.
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
    WIKILINK,
    Exchanges,
    ImportOptions,
    RowBuffer,
    bounded_lines,
    files_under,
    frontmatter,
    head,
    jsonl_lines,
    origin_drawer_id,
    to_utc,
)

ORIGIN = "claude-code"
DEFAULT_WING = "claude_code"
TYPES = ("user", "feedback", "project", "reference")
NOISE = re.compile(r"<(system-reminder|command-name|command-message|command-args|command-contents|local-command-stdout|"
                   r"local-command-stderr|user-prompt-submit-hook)>.*?</\1>", re.S)
INDEX_LINK = re.compile(r"^\s*[-*]\s*\[([^\]]+)\]\(([^)]+\.md)\)", re.M)
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
TRANSCRIPT_TYPES = ("user", "assistant", "summary", "system", "progress", "file-history-snapshot")


def _transcript_kind(raw: bytes) -> str | None:
    """The record type of a transcript line (``user``, ``progress``, ...), or None for any other line."""
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(rec, dict) and rec.get("type") in TRANSCRIPT_TYPES and (
            "sessionId" in rec or rec.get("type") in ("file-history-snapshot", "summary")):
        return rec["type"]
    return None


def _is_transcript(path: Path) -> bool:
    """Some line among the first ones is a transcript message (a transcript may open with progress,
    summary or file-history-snapshot records before any message)."""
    lines = [ln for ln in head(path, 262144).split(b"\n")[:50] if ln.strip()]
    kinds = [k for k in map(_transcript_kind, lines) if k]
    return bool(kinds) and (any(k in ("user", "assistant") for k in kinds) or len(kinds) == len(lines))


def visible_lines(path: Path) -> set[int] | None:
    """Line numbers of the visible branch, or None when the file has no parent links to follow (then
    every line is read, in order). First pass: a few fields per line, not the messages."""
    parent: dict[str, str | None] = {}
    line_of: dict[str, int] = {}
    last_leaf_candidates: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in bounded_lines(f):
            if raw is None:
                continue  # quarantined by the second pass
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("uuid"), str) or rec.get("type") not in (
                    "user", "assistant", "system"):  # progress lines hang off messages: not part of the thread
                continue
            uuid = rec["uuid"]
            up = rec.get("parentUuid") or rec.get("logicalParentUuid")  # across a compaction boundary
            parent.setdefault(uuid, up if isinstance(up, str) else None)
            line_of.setdefault(uuid, lineno)
            if rec.get("type") in ("user", "assistant") and not rec.get("isSidechain"):
                last_leaf_candidates.append(uuid)
    parent = {u: (p if p in line_of else None) for u, p in parent.items()}  # a dangling parent: a root
    if not any(parent.values()) or not last_leaf_candidates:
        return None
    has_child = {p for p in parent.values() if p}
    leaves = [u for u in last_leaf_candidates if u not in has_child]  # in file order
    node = leaves[-1] if leaves else last_leaf_candidates[-1]
    path_lines, seen = set(), set()
    while node in line_of and node not in seen:
        seen.add(node)
        path_lines.add(line_of[node])
        up = parent.get(node)
        if up is None:  # a root: a chain written before it (a resumed session) is part of the conversation
            earlier = [u for u in leaves if line_of[u] < line_of[node] and u not in seen]
            up = earlier[-1] if earlier else None
        node = up
    return path_lines


class ClaudeCodeImporter:
    name = "claude-code"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if path.is_dir():
            return (path / "CLAUDE.md").exists() or (path / "MEMORY.md").exists() or any(
                path.glob("**/memory/MEMORY.md")) or any(
                _is_transcript(p) for p in list(path.glob("*/*.jsonl"))[:5])
        if path.suffix == ".jsonl":
            return _is_transcript(path)
        if path.suffix == ".md":
            h = head(path).decode("utf-8", "replace")
            meta, _ = frontmatter(h)
            return path.name in ("CLAUDE.md", "CLAUDE.local.md", "MEMORY.md") or path.parent.name == "memory" or (
                "originSessionId" in meta) or ({"name", "description"} <= meta.keys() and "title" not in meta)
        return False

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        buf = RowBuffer(self.name, options.batch_size)
        for f in files_under(Path(path), (".md", ".jsonl")):
            if f.suffix == ".jsonl":
                yield from self._transcript(f, options, buf, quarantine)
            else:
                self._markdown(f, options, buf, quarantine)
            if buf.full():
                yield from buf.flush()
        yield from buf.flush(final=True)

    def _markdown(self, path: Path, options: ImportOptions, buf: RowBuffer, quarantine: Quarantine) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            quarantine.add(SourceFormatError(path, None, f"unreadable markdown ({exc})"), None)
            return
        meta, body = frontmatter(text)
        if not body.strip():
            quarantine.skip("empty memory files")
            return
        nested = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
        kind = nested.get("type") or meta.get("type")
        prefix = path.stem.split("_", 1)[0].lower()
        if path.name.startswith("CLAUDE"):
            room = "instructions"
        elif path.name == "MEMORY.md":
            room = "memory_index"
        else:
            room = ids.safe_name(str(kind) if kind else prefix if prefix in TYPES else "memory", "memory")
        wing = ids.safe_name(options.wing or DEFAULT_WING, DEFAULT_WING)
        name = str(meta.get("name") or path.stem)
        source = str(path.resolve())
        did = origin_drawer_id(wing, room, ORIGIN, f"file:{source}")
        try:
            buf.drawer(id=did, document=body.strip(), wing=wing, room=room, source_file=source, chunk_index=0,
                       origin_id=path.name, updated_at=nested.get("modified") or meta.get("modified"),
                       extra={"name": name, "description": meta.get("description"),
                              "origin_session_id": nested.get("originSessionId") or meta.get("originSessionId")})
        except ValueError as exc:
            quarantine.add(SourceFormatError(path, None, f"frontmatter: {exc}"), text[:2000])
            return
        targets = [m.group(1).strip() for m in WIKILINK.finditer(body)]
        targets += [Path(m.group(2)).stem for m in INDEX_LINK.finditer(body)]
        for target in dict.fromkeys(t for t in targets if t):
            buf.entity(name, "memory")
            buf.entity(target, "memory")
            buf.triple(name, "links_to", target, origin=ORIGIN, source_file=source, source_drawer_id=did)

    def _transcript(self, path: Path, options: ImportOptions, buf: RowBuffer,
                    quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        source = str(path.resolve())
        seen: set[str] = set()
        said: set[tuple[str, str]] = set()  # (message id, text) already taken from a streamed reply
        talk: Exchanges | None = None
        visible = visible_lines(path)
        with open(path, "rb") as f:
            for lineno, raw, rec in jsonl_lines(f, path, quarantine):
                if not isinstance(rec, dict) or not rec.get("type"):
                    quarantine.add(SourceFormatError(path, lineno, "not a transcript record (no type)"), raw)
                    continue
                kind, uuid = rec["type"], rec.get("uuid")
                if kind not in ("user", "assistant"):
                    quarantine.skip(f"{kind} records")
                    continue
                if visible is not None and isinstance(uuid, str) and lineno not in visible:
                    quarantine.skip("messages off the visible branch (rewound or forked)")
                    continue
                if rec.get("isSidechain"):
                    quarantine.skip("sidechain messages")
                    continue
                msg = rec.get("message")
                if not isinstance(msg, dict):
                    quarantine.add(SourceFormatError(path, lineno, f"{kind} record without a message object"), raw)
                    continue
                text, tools = _content(msg.get("content"))
                at = rec.get("timestamp")
                try:
                    to_utc(at)
                except ValueError as exc:
                    quarantine.add(SourceFormatError(path, lineno, f"timestamp: {exc}"), raw)
                    continue
                if uuid in seen:
                    quarantine.skip("repeated uuids")
                    continue
                seen.add(uuid)
                if kind == "user" and rec.get("isCompactSummary"):
                    quarantine.skip("compaction summaries")
                    continue
                if kind == "assistant" and isinstance(msg.get("id"), str):
                    if (msg["id"], text) in said:  # a streamed line repeating what was already taken
                        continue
                    said.add((msg["id"], text))
                if kind == "user":
                    if not text:  # tool results and harness-only turns continue the exchange
                        quarantine.skip("tool results and harness output")
                        continue
                    cwd = rec.get("cwd")
                    wing = ids.safe_name(options.wing or (Path(cwd).name if cwd else DEFAULT_WING), DEFAULT_WING)
                    session = rec.get("sessionId") or path.stem
                    if talk is None or talk.wing != wing:
                        if talk is not None:
                            talk.close()
                        talk = Exchanges(buf, wing=wing, origin=ORIGIN, source=source,
                                         extra={"session_id": session, "git_branch": rec.get("gitBranch")})
                    talk.user(text, f"{session}:{uuid or f'line{lineno}'}", at)
                elif talk is not None:
                    talk.reply(text, at)
                    if tools:
                        quarantine.skip("tool calls", len(tools))
                if buf.full():
                    yield from buf.flush()
        if talk is not None:
            talk.close()


def _content(content) -> tuple[str, list[str]]:
    """(visible text with harness noise stripped, names of the tools called)."""
    if isinstance(content, str):
        blocks = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        blocks = [b if isinstance(b, dict) else {"type": "text", "text": str(b)} for b in content]
    else:
        return "", []
    text = "\n".join(b.get("text") or "" for b in blocks if b.get("type") == "text")
    tools = [str(b.get("name")) for b in blocks if b.get("type") == "tool_use"]
    return ANSI.sub("", NOISE.sub("", text)).strip(), tools

"""Basic Memory: a project folder of markdown notes (the files are its source of truth).

- Each note -> one drawer, its body verbatim; wing = ``--wing`` or the project folder's name;
  room = the note's first folder, else its frontmatter ``type``, else ``notes``. Timestamps from
  frontmatter ``created``/``modified`` (or ``date``), else the file's mtime.
- ``- [category] content #tag (context)`` observations -> triples (title, ``has_<category>``,
  content); timestamp-shaped ``[00:01]`` and task markers ``[ ]`` ``[x]`` are not categories.
- ``- relation_type [[Target]] (context)`` relations -> triples (title, relation_type, Target);
  other ``[[links]]`` in the prose -> ``links_to``. Unresolved targets are still valid entities.
- The note title (frontmatter ``title``, else the file stem) is a KG entity of the note's type.

Its ``memory.db`` index is rebuildable from the files and is not read; its vectors are
bge-small-en-v1.5, another model, so nothing is carried.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from importers.quarantine import Quarantine
from palace import ids
from palace.errors import SourceFormatError

from .base import (
    WIKILINK,
    ImportOptions,
    RowBuffer,
    files_under,
    frontmatter,
    head,
    origin_drawer_id,
)

ORIGIN = "basic-memory"
BULLET = r"^\s*(?:[-*+]|\d{1,4}[.)])\s+"  # "- ", "* ", "+ " or a numbered item "1. " / "2) "
OBSERVATION = re.compile(BULLET + r"\[([^\[\]]+)\]\s+(.+?)\s*$")
RELATION = re.compile(BULLET + r"([A-Za-z_][\w -]*?)\s+\[\[([^\]]+)\]\](?:\s*\(([^)]*)\))?\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
NOT_CATEGORY = re.compile(r"^(?:\s|[xX/>?-]|\d{1,2}:\d{2}(?::\d{2})?)$")
TAG = re.compile(r"(?<![\w&])#([\w/-]+)")
CONTEXT = re.compile(r"\s*\(([^()]*)\)\s*$")


def prose_lines(body: str) -> list[str]:
    """The body's lines outside fenced code blocks: a ``[[link]]`` or ``- [category]`` line in a code
    example is an example, not a relation or an observation."""
    out, fence = [], None
    for line in body.splitlines():
        m = FENCE.match(line)
        if m and fence is None:
            fence = m.group(1)
        elif m and m.group(1) == fence:
            fence = None
        elif fence is None:
            out.append(line)
    return out


def observations(body: str) -> Iterator[tuple[str, str, list[str], str | None]]:
    """(category, content, tags, context) of each observation line."""
    for line in prose_lines(body):
        m = OBSERVATION.match(line)
        if not m or NOT_CATEGORY.match(m.group(1)):
            continue
        content = m.group(2)
        ctx = CONTEXT.search(content)
        context = ctx.group(1) if ctx else None
        content = content[:ctx.start()] if ctx else content
        tags = TAG.findall(content)
        content = TAG.sub("", content).strip()
        if content:
            yield m.group(1).strip(), content, tags, context


def relations(body: str) -> Iterator[tuple[str, str]]:
    """(relation_type, target) of each relation line, then ``links_to`` for the other wiki-links."""
    listed, lines = set(), prose_lines(body)
    for line in lines:
        if m := RELATION.match(line):
            target = WIKILINK.match(f"[[{m.group(2)}]]")
            listed.add(line)
            yield m.group(1).strip(), (target.group(1) if target else m.group(2)).strip()
    for line in lines:
        if line not in listed:
            for link in WIKILINK.finditer(line):
                yield "links_to", link.group(1).strip()


def _looks_like_note(path: Path) -> bool:
    meta, body = frontmatter(head(path, 16384).decode("utf-8", "replace"))
    return "permalink" in meta or ("title" in meta and bool(OBSERVATION.search(body) or RELATION.search(body)))


class BasicMemoryImporter:
    name = "basic-memory"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if path.is_file():
            return path.suffix == ".md" and _looks_like_note(path)
        return path.is_dir() and any(_looks_like_note(p) for p in files_under(path, (".md",))[:20])

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        root = Path(path)
        buf = RowBuffer(self.name, options.batch_size)
        wing = ids.safe_name(options.wing or (root.resolve().name if root.is_dir() else "basic_memory"),
                             "basic_memory")
        for f in files_under(root, (".md",)):
            try:
                text = f.read_text(encoding="utf-8")
                self._note(f, root, text, wing, buf)
            except (UnicodeDecodeError, ValueError) as exc:
                quarantine.add(SourceFormatError(f, None, f"note not imported: {exc}"), None)
            if buf.full():
                yield from buf.flush()
        yield from buf.flush(final=True)

    def _note(self, f: Path, root: Path, text: str, wing: str, buf: RowBuffer) -> None:
        meta, body = frontmatter(text)
        if not body.strip():
            return
        rel = f.relative_to(root) if root.is_dir() else Path(f.name)
        title = str(meta.get("title") or f.stem).strip()
        kind = str(meta.get("type") or "note")
        room = ids.safe_name(rel.parts[0] if len(rel.parts) > 1 else meta.get("type") or "notes", "notes")
        key = str(meta.get("permalink") or rel.with_suffix("").as_posix())
        mtime, source = os.stat(f).st_mtime, str(f.resolve())
        drawer = origin_drawer_id(wing, room, ORIGIN, key)
        tags = meta.get("tags")
        if isinstance(tags, str):  # one comma-joined string, as some notes write it
            tags = [t.strip() for t in tags.split(",") if t.strip()]
        buf.drawer(id=drawer, document=body.strip(), wing=wing, room=room, source_file=source,
                   chunk_index=0, origin_id=key, created_at=meta.get("created") or meta.get("date") or mtime,
                   updated_at=meta.get("modified") or meta.get("updated") or mtime,
                   extra={"title": title, "note_type": kind, "permalink": meta.get("permalink"),
                          "tags": ";".join(map(str, tags)) if isinstance(tags, list) else tags})
        buf.entity(title, kind, {"permalink": meta.get("permalink")} if meta.get("permalink") else None)
        for category, content, _, _ in observations(body):
            buf.triple(title, f"has_{category}", content, origin=f"{ORIGIN}:{key}", source_file=source,
                       source_drawer_id=drawer)
        for rel_type, target in relations(body):
            buf.triple(title, rel_type, target, origin=f"{ORIGIN}:{key}", source_file=source, source_drawer_id=drawer)

"""Deterministic ids and name normalisation, exactly as MemPalace 3.11 does them.

Drawer ids follow ``mempalace.ids`` (recipe ``v3``: sha256 over length-prefixed
parts); wing/room names must pass ``mempalace.config.sanitize_name``; KG entity
ids and predicates follow ``KnowledgeGraph._entity_id`` and ``add_triple``.
"""
from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from typing import BinaryIO

ID_RECIPE = "v3"
MAX_NAME_LENGTH = 128
# mempalace.config._SAFE_NAME_RE
_SAFE_NAME_RE = re.compile(r"^(?:[^\W_]|[^\W_][\w .'-]{0,126}[^\W_])$")


def v3_hash(*parts: object, length: int = 24) -> str:
    """sha256 of ``len:part`` joined parts, truncated; ``None`` hashes as ``"None"``."""
    key = "".join(f"{len(p)}:{p}" for p in map(str, parts)).encode()
    return hashlib.sha256(key).hexdigest()[:length]


def drawer_id_from_content(wing: str, room: str, content: str) -> str:
    """MemPalace's ``make_drawer_id_from_content`` (MCP add_drawer recipe)."""
    return f"drawer_{wing}_{room}_{v3_hash(wing, room, content)}"


def drawer_id_from_chunk(wing: str, room: str, source_file: str, chunk_index: int) -> str:
    """MemPalace's ``make_drawer_id_from_chunk`` (project miner recipe)."""
    return f"drawer_{wing}_{room}_{v3_hash(source_file, str(chunk_index))}"


def is_valid_name(value: str) -> bool:
    """True when MemPalace's ``sanitize_name`` would accept ``value`` unchanged."""
    return (
        isinstance(value, str)
        and value == value.strip()
        and 0 < len(value) <= MAX_NAME_LENGTH
        and ".." not in value
        and "/" not in value
        and "\\" not in value
        and "\x00" not in value
        and bool(_SAFE_NAME_RE.match(value))
    )


def safe_name(value: str | None, default: str = "general") -> str:
    """Return ``value`` if MemPalace accepts it as a wing/room name, else a slug of it.

    The slug keeps letters and digits of any script (MemPalace's regex is
    Unicode-aware), maps everything else to ``_``, trims leading/trailing
    non-alphanumerics and caps the length.
    """
    if value is not None and is_valid_name(value):
        return value
    text = unicodedata.normalize("NFKC", str(value or "")).lower()
    text = re.sub(r"[^\w]+", "_", text)
    text = re.sub(r"_+", "_", text).strip("_")[:MAX_NAME_LENGTH].strip("_")
    return text if text and is_valid_name(text) else default


def entity_id(name: str) -> str:
    """``KnowledgeGraph._entity_id``."""
    return name.lower().replace(" ", "_").replace("'", "")


def normalize_predicate(predicate: str) -> str:
    """``KnowledgeGraph.add_triple``'s predicate normalisation."""
    return predicate.lower().replace(" ", "_")


def triple_id(subject: str, predicate: str, obj: str, valid_from: str | None, origin: str) -> str:
    """``t_{sub}_{pred}_{obj}_`` + 12 hex, MemPalace's shape.

    MemPalace hashes ``(valid_from, now)``, which is not reproducible; we hash
    ``(valid_from, origin)`` instead so that re-importing a source yields the
    same id and upserts rather than duplicates.
    """
    sub, pred, ob = entity_id(subject), normalize_predicate(predicate), entity_id(obj)
    return f"t_{sub}_{pred}_{ob}_{v3_hash(valid_from, origin, length=12)}"


def content_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through it into ``sink``."""

    def __init__(self, sink: BinaryIO):
        self.sink, self.sha, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.sink.write(b)
        return len(b)


def sha256_file(path) -> str:
    """sha256 of a file's bytes (streamed by ``hashlib.file_digest``)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

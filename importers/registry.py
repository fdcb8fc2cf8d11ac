"""Importers by CLI name, and format sniffing for ``import auto``.

The catalogue names each importer's module without importing it: the CLI builds its commands and
``sources`` from it, and a module (with pyarrow, ijson, yaml...) is loaded only when used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from palace.errors import PalaceEtlError

if TYPE_CHECKING:
    from .base import Importer


@dataclass(frozen=True)
class Entry:
    module: str  # in importers/
    cls: str
    description: str
    tables: bool = False  # a generic table: takes --map FIELD=COLUMN and a vector declaration


CATALOGUE: dict[str, Entry] = {
    "mcp-memory": Entry("mcp_memory", "McpMemoryImporter",
        "MCP memory server memory.jsonl / memory.json / read_graph JSON"),
    "mem0": Entry("mem0", "Mem0Importer",
        "mem0 get_all / Platform JSON, OSS history.db, OpenMemory export zip"),
    "letta": Entry("letta", "LettaImporter",
        "Letta / MemGPT agent file (.af, v1, v2 and double-encoded)"),
    "zep": Entry("zep", "ZepImporter",
        "Zep / Graphiti dump JSON (episodes, entities, facts with valid_at/invalid_at)"),
    "mcp-memory-service": Entry("mcp_memory_service", "McpMemoryServiceImporter",
        "mcp-memory-service sqlite_vec.db or its JSON export"),
    "claude-code": Entry("claude_code", "ClaudeCodeImporter",
        "Claude Code CLAUDE.md, auto-memory memory/*.md and session .jsonl transcripts"),
    "chatgpt": Entry("chatgpt", "ChatGPTImporter",
        "ChatGPT export conversations.json (array/object, split files), saved memories"),
    "claude-ai": Entry("claude_ai", "ClaudeAIImporter",
        "Claude.ai export: conversations.json, memories, projects"),
    "basic-memory": Entry("basic_memory", "BasicMemoryImporter",
        "Basic Memory project folder: markdown notes with observations and [[relations]]"),
    "claude-mem": Entry("claude_mem", "ClaudeMemImporter",
        "claude-mem SQLite database (observations, session summaries) or its JSON export"),
    "jsonl": Entry("jsonl", "JsonlImporter",
        "generic JSONL rows (text, id, wing, room, created_at, tags, metadata, embedding; triples)",
        tables=True),
    "csv": Entry("csv_rows", "CsvImporter",
        "generic CSV/TSV with a header (text, id, wing, room, created_at, tags, embedding; triples)",
        tables=True),
    "parquet": Entry("parquet", "ParquetImporter",
        "generic Parquet rows (text, id, wing, room, created_at, tags, embedding; triples)",
        tables=True),
    "mempalace-jsonl": Entry("mempalace_jsonl", "MempalaceJsonlImporter",
        "MemPalace JSONL export: <wing>/<room>.jsonl lines of {id, document, metadata}"),
    "palace": Entry("palace_dir", "PalaceImporter",
        "another MemPalace palace directory (read-only; drawers, vectors, knowledge graph)"),
}
_loaded: dict[str, Importer] = {}


def get_importer(name: str) -> Importer:
    if name not in CATALOGUE:
        raise PalaceEtlError(f"select importer {name!r}: unknown",
                             hint="`palace-etl sources` lists the importers")
    if name not in _loaded:
        entry = CATALOGUE[name]
        _loaded[name] = getattr(importlib.import_module(f"importers.{entry.module}"), entry.cls)()
    return _loaded[name]


def detect(path: Path) -> list[str]:
    """Names of the importers whose ``detect`` accepts ``path``."""
    return [name for name in CATALOGUE if get_importer(name).detect(Path(path))]


def choose(path: Path) -> str:
    """The one importer that recognises ``path``; otherwise an error listing the candidates."""
    from .base import (
        check_source,  # (not at import: the CLI starts without loading any importer)
    )

    check_source("auto", Path(path))  # a FIFO or device is refused before any importer sniffs it
    found = detect(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise PalaceEtlError(f"import auto {path}: no importer recognises this format",
                             hint="`palace-etl sources` lists them; name one: palace-etl import NAME PATH")
    raise PalaceEtlError(f"import auto {path}: several formats match: {', '.join(found)}",
                         hint=f"name one: palace-etl import {found[0]} {path} ...")

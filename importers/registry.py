"""Importers by CLI name, and format sniffing for ``import auto``."""
from __future__ import annotations

from pathlib import Path

from etl.errors import PalaceEtlError, SourceMissing

from .base import Importer
from .basic_memory import BasicMemoryImporter
from .chatgpt import ChatGPTImporter
from .claude_ai import ClaudeAIImporter
from .claude_code import ClaudeCodeImporter
from .claude_mem import ClaudeMemImporter
from .csv_rows import CsvImporter
from .jsonl import JsonlImporter
from .letta import LettaImporter
from .mcp_memory import McpMemoryImporter
from .mcp_memory_service import McpMemoryServiceImporter
from .mem0 import Mem0Importer
from .mempalace_jsonl import MempalaceJsonlImporter
from .palace_dir import PalaceImporter
from .parquet import ParquetImporter
from .zep import ZepImporter

IMPORTERS: dict[str, Importer] = {imp.name: imp for imp in (
    McpMemoryImporter(), Mem0Importer(), LettaImporter(), ZepImporter(), McpMemoryServiceImporter(),
    ClaudeCodeImporter(), ChatGPTImporter(), ClaudeAIImporter(), BasicMemoryImporter(), ClaudeMemImporter(),
    JsonlImporter(), CsvImporter(), ParquetImporter(), MempalaceJsonlImporter(), PalaceImporter(),
)}


def get_importer(name: str) -> Importer:
    try:
        return IMPORTERS[name]
    except KeyError:
        raise PalaceEtlError(f"select importer {name!r}: unknown",
                             hint="`palace-etl sources` lists the importers") from None


def detect(path: Path) -> list[str]:
    """Names of the importers whose ``detect`` accepts ``path``."""
    return [name for name, imp in IMPORTERS.items() if imp.detect(Path(path))]


def choose(path: Path) -> str:
    """The one importer that recognises ``path``; otherwise an error listing the candidates."""
    if not Path(path).exists():
        raise SourceMissing(f"import auto {path}: no such file or directory")
    found = detect(path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise PalaceEtlError(f"import auto {path}: no importer recognises this format",
                             hint="`palace-etl sources` lists them; name one: palace-etl import NAME PATH")
    raise PalaceEtlError(f"import auto {path}: several formats match: {', '.join(found)}",
                         hint=f"name one: palace-etl import {found[0]} {path} ...")

"""Importers by CLI name, and format sniffing for ``import auto``."""
from __future__ import annotations

from pathlib import Path

from etl.errors import PalaceEtlError

from .base import Importer
from .mcp_memory import McpMemoryImporter

IMPORTERS: dict[str, Importer] = {imp.name: imp for imp in (McpMemoryImporter(),)}


def get_importer(name: str) -> Importer:
    try:
        return IMPORTERS[name]
    except KeyError:
        raise PalaceEtlError(f"select importer {name!r}: unknown",
                             hint="`palace-etl sources` lists the importers") from None


def detect(path: Path) -> list[str]:
    """Names of the importers whose ``detect`` accepts ``path``."""
    return [name for name, imp in IMPORTERS.items() if imp.detect(Path(path))]

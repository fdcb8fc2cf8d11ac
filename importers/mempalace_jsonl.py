"""MemPalace's JSONL interchange: ``<wing>/<room>.jsonl``, one ``{"id", "document", "metadata"}`` per
line (upstream PR #453 / #2209, and ``palace-etl export --format jsonl``), so exports round-trip.

Drawer ids are kept as they are. wing/room come from the metadata, else from the directory and
file name; ``source_file``, ``chunk_index``, ``added_by``, ``filed_at`` and ``hall`` map to their
fields, every other scalar key stays metadata. ``export-manifest.json`` and other non-JSONL files
are ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import orjson
import pyarrow as pa

from importers.quarantine import Quarantine
from palace import ids
from palace.errors import SourceFormatError

from .base import ImportOptions, RowBuffer, files_under, head, jsonl_lines

ORIGIN = "mempalace-jsonl"
MAPPED = ("wing", "room", "source_file", "chunk_index", "added_by", "filed_at", "hall", "created_at", "updated_at")
# metadata the loader writes itself (provenance of this import, not of the exported one)
LOADER_KEYS = ("last_modified", "id_recipe", "normalize_version", "origin_system", "origin_id", "content_sha256")


def _is_export_line(raw: bytes) -> bool:
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(rec, dict) and {"id", "document", "metadata"} <= rec.keys()


def drawer_from_export(buf: RowBuffer, rec: dict, source: str, wing: str | None = None,
                       fallback: tuple[str | None, str | None] = (None, None),
                       embedding=None, embedder: str | None = None) -> None:
    """One exported row ``{id, document, metadata}`` into ``buf``, keeping its id (the palace importer
    shares it). ``wing`` overrides; ``fallback`` (wing, room) is for rows without them (MemPalace's
    sweep rows). Raises ValueError on a row that is not a drawer."""
    did, doc, meta = rec.get("id"), rec.get("document"), rec.get("metadata") or {}
    if not isinstance(did, str) or not did or not isinstance(doc, str) or not isinstance(meta, dict):
        raise ValueError("needs a string id and document and an object metadata")
    chunk = meta.get("chunk_index")
    buf.drawer(id=did, document=doc, wing=ids.safe_name(wing or meta.get("wing") or fallback[0], "unfiled"),
               room=ids.safe_name(meta.get("room") or fallback[1], "general"),
               source_file=meta["source_file"] if isinstance(meta.get("source_file"), str) else source,
               chunk_index=chunk if isinstance(chunk, int) and not isinstance(chunk, bool) else 0,
               added_by=str(meta.get("added_by") or "palace-etl"), hall=meta.get("hall") or None,
               filed_at=meta.get("filed_at") if isinstance(meta.get("filed_at"), str) else None,
               origin_id=did, created_at=meta.get("created_at"), updated_at=meta.get("updated_at"),
               extra={k: v for k, v in meta.items() if k not in MAPPED and k not in LOADER_KEYS},
               embedding=embedding, embedder=embedder)


class MempalaceJsonlImporter:
    name = "mempalace-jsonl"

    def detect(self, path: Path) -> bool:
        files = files_under(Path(path), (".jsonl",)) if Path(path).exists() else []
        return bool(files) and _is_export_line(head(files[0]).split(b"\n", 1)[0])

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        buf = RowBuffer(self.name, options.batch_size)
        for f in files_under(Path(path), (".jsonl",)):
            source = str(f.resolve())
            fallback = tuple(None if n.startswith("_no_") else n for n in (f.parent.name, f.stem))
            with open(f, "rb") as fh:
                for lineno, raw, rec in jsonl_lines(fh, f, quarantine):
                    try:
                        if not isinstance(rec, dict):
                            raise ValueError("not a JSON object")
                        drawer_from_export(buf, rec, source, options.wing, fallback)
                    except ValueError as exc:
                        quarantine.add(SourceFormatError(f, lineno, str(exc)), raw)
                    if buf.full():
                        yield from buf.flush()
        yield from buf.flush(final=True)

"""Generic JSONL (one memory per line) or a JSON array of such records; see ``tabular`` for the
fields and ``--map FIELD=COLUMN``."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import ijson
import orjson
import pyarrow as pa

from importers.quarantine import Quarantine

from .base import (
    ImportOptions,
    files_under,
    head,
    json_depth_exceeds,
    json_records,
    jsonl_lines,
)
from .tabular import looks_like_rows, table_batches

SUFFIXES = (".jsonl", ".ndjson", ".json")


def _first_record(path: Path):
    h = head(path).lstrip()
    try:
        if h[:1] == b"[":
            if json_depth_exceeds(io.BytesIO(h)):
                return None
            return next(ijson.items(io.BytesIO(h), "item"), None)
        return orjson.loads(h.split(b"\n", 1)[0])
    except (ijson.JSONError, orjson.JSONDecodeError, StopIteration):
        return None


def is_rows_file(path: Path) -> bool:
    rec = _first_record(path)
    return isinstance(rec, dict) and looks_like_rows(rec) and not {"document", "metadata"} <= rec.keys()


def _read(path: Path, quarantine: Quarantine):
    if head(path, 4096).lstrip()[:1] == b"[":
        for _, n, rec in json_records(path, (), quarantine):
            yield None, f"record {n}: ", rec
        return
    with open(path, "rb") as f:
        for lineno, _, rec in jsonl_lines(f, path, quarantine):
            yield lineno, "", rec


class JsonlImporter:
    name = "jsonl"

    def detect(self, path: Path) -> bool:
        files = files_under(Path(path), SUFFIXES) if Path(path).exists() else []
        return bool(files) and is_rows_file(files[0])

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        return table_batches(self.name, path, SUFFIXES, options, quarantine, _read)

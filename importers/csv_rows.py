"""Generic CSV / TSV with a header row (one memory per row); see ``tabular`` for the columns and
``--map FIELD=COLUMN``. Streams with the csv module: quoted fields may hold newlines."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from importers.quarantine import Quarantine
from palace.errors import SourceFormatError

from .base import MAX_LINE, ImportOptions, files_under, head
from .tabular import looks_like_rows, table_batches

SUFFIXES = (".csv", ".tsv")
csv.field_size_limit(MAX_LINE)  # memories can be long (the default is 128 KiB), but not unbounded


def _reader(f, path: Path):
    return csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")


def _lines(f) -> Iterator[str]:
    """The lines of a text stream, none held longer than ``MAX_LINE`` characters."""
    while line := f.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE:
            raise csv.Error(f"a line longer than {MAX_LINE >> 20} MiB")
        yield line


def _read(path: Path, quarantine: Quarantine):
    line = 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = _reader(_lines(f), path)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    quarantine.add(SourceFormatError(path, reader.line_num, f"{len(row)} fields, the header has "
                                                     f"{len(header)}"), ",".join(row))
                    continue
                yield reader.line_num, "", {k: (v if v != "" else None) for k, v in zip(header, row)}
                line = reader.line_num
        except (csv.Error, UnicodeDecodeError) as exc:  # the rest of the file cannot be read reliably
            quarantine.add(SourceFormatError(path, line + 1, f"unreadable from here on ({exc})"), None)


class CsvImporter:
    name = "csv"

    def detect(self, path: Path) -> bool:
        files = files_under(Path(path), SUFFIXES) if Path(path).exists() else []
        if not files:
            return False
        first = head(files[0], 8192).decode("utf-8-sig", "replace").splitlines()[:1]
        return bool(first) and looks_like_rows(h.strip() for h in next(_reader(first, files[0]), []))

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        return table_batches(self.name, path, SUFFIXES, options, quarantine, _read)

"""Generic Parquet (one memory per row), read a row group at a time; see ``tabular`` for the
columns and ``--map FIELD=COLUMN``. A list<float> column can carry vectors."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from importers.quarantine import Quarantine
from palace.errors import SourceFormatError

from .base import ImportOptions, files_under, head
from .tabular import looks_like_rows, table_batches

SUFFIXES = (".parquet",)


def _read(path: Path, quarantine: Quarantine):
    if path.stat().st_size == 0:
        return
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            for rec in batch.to_pylist():
                n += 1
                yield None, f"row {n}: ", rec
    except (pa.ArrowException, OSError) as exc:
        quarantine.add(SourceFormatError(path, None, f"unreadable Parquet after row {n} ({exc})"), None)


class ParquetImporter:
    name = "parquet"

    def detect(self, path: Path) -> bool:
        files = files_under(Path(path), SUFFIXES) if Path(path).exists() else []
        if not files or head(files[0], 4) != b"PAR1":
            return False
        try:
            return looks_like_rows(pq.read_schema(files[0]).names)
        except (pa.ArrowException, OSError):
            return False

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        return table_batches(self.name, path, SUFFIXES, options, quarantine, _read)

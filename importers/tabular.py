"""The generic row format shared by the ``jsonl``, ``csv`` and ``parquet`` importers.

One memory per row. Canonical fields (rename a source column with ``--map FIELD=COLUMN``):

- ``text`` (required), ``id``, ``wing``, ``room``, ``hall``, ``created_at``, ``updated_at`` (ISO or
  epoch s/ms/us), ``tags`` (a list or a ``;``/``,`` string), ``source``, ``metadata`` (an object or
  its JSON text), ``embedding`` (a list, or its JSON / ``;``-joined text).
- A row without text but with ``subject``, ``predicate`` and ``object`` is a triple (plus
  ``valid_from``, ``valid_to``, ``confidence``, ``source``).

Every other scalar column is kept as drawer metadata. wing = ``--wing``, else the row's wing, else
the file's name; room = the row's room, else ``general``. The drawer id comes from the row's id
(else its text), so re-importing an edited row updates its drawer. A vector column is used only
when its model is declared (``--vector-model``, ``--vector-dim``); the loader carries it when that
identity is the palace's, and re-embeds otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson
import pyarrow as pa

from importers.quarantine import Quarantine
from palace import ids
from palace.errors import PalaceEtlError, SourceFormatError

from .base import ImportOptions, RowBuffer, files_under, iso, origin_drawer_id

DRAWER_FIELDS = ("text", "id", "wing", "room", "hall", "created_at", "updated_at", "tags", "source", "metadata",
                 "embedding")
TRIPLE_FIELDS = ("subject", "predicate", "object", "valid_from", "valid_to", "confidence")
FIELDS = DRAWER_FIELDS + TRIPLE_FIELDS


def check_columns(options: ImportOptions) -> None:
    unknown = sorted(f for f, _ in options.columns if f not in FIELDS)
    if unknown:
        raise PalaceEtlError(f"map columns: unknown field {', '.join(unknown)}",
                             hint=f"--map FIELD=COLUMN, FIELD one of: {', '.join(FIELDS)}")
    if bool(options.vector_model) != bool(options.vector_dim):
        raise PalaceEtlError("declare vectors: --vector-model and --vector-dim go together",
                             hint="e.g. --vector-model minilm --vector-dim 384")


def looks_like_rows(names: Iterable[str]) -> bool:
    """A header or first record with a ``text`` column, or a triple's three: for ``detect``."""
    names = set(names)
    return "text" in names or {"subject", "predicate", "object"} <= names


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _flat(v: Any) -> Any:
    """A metadata value as a flat scalar (lists ``;``-joined, objects as JSON), or None."""
    if _blank(v):
        return None
    if isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return ";".join(str(x) for x in v)
    return orjson.dumps(v, default=str, option=orjson.OPT_SORT_KEYS).decode()


def _tags(v: Any) -> str | None:
    if isinstance(v, str):
        v = v.replace(",", ";").split(";")
    tags = [str(t).strip() for t in v or [] if str(t).strip()]
    return ";".join(tags) or None


def _vector(v: Any) -> list[float] | None:
    if _blank(v):
        return None
    if isinstance(v, str):
        v = orjson.loads(v) if v.lstrip().startswith("[") else [x for x in v.split(";") if x.strip()]
    return [float(x) for x in v]


class Rows:
    """Turns generic rows into drawers and triples in a RowBuffer."""

    def __init__(self, origin: str, options: ImportOptions, buf: RowBuffer, quarantine: Quarantine):
        self.origin, self.options, self.buf, self.quarantine = origin, options, buf, quarantine
        self.cols = {f: options.column(f) for f in FIELDS}
        self.used = set(self.cols.values())

    def add(self, rec: Any, path: Path, line: int | None, default_wing: str, source: str, label: str = "") -> None:
        """One row; ``line`` (or ``label``, e.g. "record 7" of a JSON array) says where it was."""
        if not isinstance(rec, dict):
            self.quarantine.add(SourceFormatError(path, line, f"{label}not a record (an object with columns)"),
                                orjson.dumps(rec, default=str))
            return
        try:
            if _blank(self._get(rec, "text")) and all(not _blank(self._get(rec, f))
                                                      for f in ("subject", "predicate", "object")):
                self._triple(rec, source)
            else:
                self._drawer(rec, source, default_wing)
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            self.quarantine.add(SourceFormatError(path, line, f"{label}{exc}"), orjson.dumps(rec, default=str))

    def _get(self, rec: dict, field: str) -> Any:
        return rec.get(self.cols[field])

    def _drawer(self, rec: dict, source: str, default_wing: str) -> None:
        text = self._get(rec, "text")
        if _blank(text) or not isinstance(text, str):
            raise ValueError(f"no text in column {self.cols['text']!r} (rename one with --map text=COLUMN)")
        wing = ids.safe_name(self.options.wing or _flat(self._get(rec, "wing")) or default_wing, "imported")
        room = ids.safe_name(_flat(self._get(rec, "room")) or "general", "general")
        key = _flat(self._get(rec, "id"))
        origin = str(key) if key is not None else ids.v3_hash(text)
        meta = self._get(rec, "metadata")
        if isinstance(meta, str) and meta.strip():
            meta = orjson.loads(meta)
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"column {self.cols['metadata']!r} is not an object")
        extra = {k: _flat(v) for k, v in rec.items() if k not in self.used}
        extra.update({k: _flat(v) for k, v in (meta or {}).items()})
        extra["tags"] = _tags(self._get(rec, "tags"))
        vector = _vector(self._get(rec, "embedding"))
        if vector is not None and not self.options.vector_model:
            self.quarantine.skip("vectors ignored: no --vector-model/--vector-dim declared (re-embedded)")
            vector = None
        if vector is not None and len(vector) != self.options.vector_dim:
            raise ValueError(f"embedding has {len(vector)} dimensions, --vector-dim says {self.options.vector_dim}")
        self.buf.drawer(id=origin_drawer_id(wing, room, self.origin, origin), document=text, wing=wing, room=room,
                        hall=_flat(self._get(rec, "hall")), source_file=str(_flat(self._get(rec, "source")) or source),
                        chunk_index=0, origin_id=origin, created_at=self._get(rec, "created_at"),
                        updated_at=self._get(rec, "updated_at") or self._get(rec, "created_at"),
                        extra={k: v for k, v in extra.items() if v is not None},
                        embedding=vector, embedder=self.options.vector_model)

    def _triple(self, rec: dict, source: str) -> None:
        s, p, o = (str(_flat(self._get(rec, f))) for f in ("subject", "predicate", "object"))
        valid_from, valid_to = iso(self._get(rec, "valid_from")), iso(self._get(rec, "valid_to"))
        if valid_from and valid_to and valid_to < valid_from:
            raise ValueError(f"valid_to {valid_to} is before valid_from {valid_from}")
        confidence = self._get(rec, "confidence")
        self.buf.triple(s, p, o, origin=self.origin, valid_from=valid_from, valid_to=valid_to,
                        confidence=1.0 if _blank(confidence) else float(confidence),
                        source_file=str(_flat(self._get(rec, "source")) or source))


def table_batches(origin: str, path: Path, suffixes: tuple[str, ...], options: ImportOptions,
                  quarantine: Quarantine, read) -> Iterator[pa.RecordBatch]:
    """Batches from every matching file under ``path``; ``read(file, quarantine)`` yields
    ``(line, label, record)``: the line number, or None and a label like "record 7: ". Bad options
    are refused now, before the first batch is asked for."""
    check_columns(options)
    return _table_batches(origin, path, suffixes, options, quarantine, read)


def _table_batches(origin, path, suffixes, options, quarantine, read) -> Iterator[pa.RecordBatch]:
    buf = RowBuffer(origin, options.batch_size)
    rows = Rows(origin, options, buf, quarantine)
    for f in files_under(Path(path), suffixes):
        source, wing = str(f.resolve()), ids.safe_name(f.stem, "imported")
        for line, label, rec in read(f, quarantine):
            rows.add(rec, f, line, wing, source, label)
            if buf.full():
                yield from buf.flush()
    yield from buf.flush(final=True)

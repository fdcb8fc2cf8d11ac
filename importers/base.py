"""What every importer shares: the protocol, options, and a row buffer that builds batches."""
from __future__ import annotations

import datetime as dt
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Protocol

import ijson
import orjson
import pyarrow as pa
import yaml

from importers.quarantine import Quarantine
from importers.schema import ENTITY_SCHEMA, TRIPLE_SCHEMA, drawer_schema, extra_json
from palace import ids
from palace.chroma_sqlite import ro_uri
from palace.errors import SourceFormatError, SourceMissing


@dataclass(frozen=True)
class ImportOptions:
    wing: str | None = None  # overrides the importer's default wing
    batch_size: int = 1000  # drawer rows per batch
    # generic tables (jsonl / csv / parquet) only: canonical field -> source column, and the model
    # identity of a vector column
    columns: tuple[tuple[str, str], ...] = ()
    vector_model: str | None = None
    vector_dim: int | None = None

    def __post_init__(self):
        if isinstance(self.columns, dict):  # from the run ledger's JSON
            object.__setattr__(self, "columns", tuple(sorted(self.columns.items())))

    def column(self, name: str) -> str:
        """The source column that holds canonical field ``name``."""
        return dict(self.columns).get(name, name)

    def to_dict(self) -> dict:
        out = {"wing": self.wing, "batch_size": self.batch_size}
        if self.columns:  # only when set: run ids of plain imports stay what they were
            out["columns"] = dict(self.columns)
        if self.vector_model or self.vector_dim:
            out.update(vector_model=self.vector_model, vector_dim=self.vector_dim)
        return out


class Importer(Protocol):
    """One prior memory system; registry.CATALOGUE names it and describes it for the CLI."""

    name: str

    def detect(self, path: Path) -> bool:
        """Cheap sniff: does ``path`` look like this importer's format?"""

    def batches(self, path: Path, options: ImportOptions, quarantine: Quarantine) -> Iterator[pa.RecordBatch]:
        """Stream canonical drawer / entity / triple batches; report bad records to ``quarantine``."""


def to_utc(value: Any) -> dt.datetime | None:
    """Parse an ISO string or epoch seconds/milliseconds/microseconds into an aware UTC datetime.

    Raises ValueError on text that is not a timestamp (the importer quarantines the record)."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        secs = value / 1e6 if value > 1e14 else value / 1000 if value > 1e11 else value
        return dt.datetime.fromtimestamp(secs, tz=dt.timezone.utc)
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return to_utc(float(text))
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text[:60]!r} is not a timestamp (ISO 8601 or epoch seconds/ms)") from None
    return parsed.replace(tzinfo=dt.timezone.utc) if parsed.tzinfo is None else parsed.astimezone(dt.timezone.utc)


def iso(value: Any) -> str | None:
    """A timestamp as UTC ISO text (for KG validity columns), or None."""
    when = to_utc(value)
    return when.isoformat() if when else None


def text_of(rec: dict, *keys: str) -> str | None:
    """The first non-blank string among ``keys``."""
    for k in keys:
        v = rec.get(k)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return None


def head(path: Path, n: int = 65536) -> bytes:
    """The first bytes of a file (b"" when it cannot be read): for ``detect``."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would block detect forever
            return b""
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def files_under(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """``path`` itself, or the files under a directory with one of ``suffixes`` (sorted, dot-dirs skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


MAX_LINE = 64 << 20  # a JSONL line longer than this is no memory record: quarantined, never held whole
MAX_JSON_DEPTH = 256  # real exports nest a few dozen levels; ijson's cost grows with depth squared
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"\\[]{}')


def json_depth_exceeds(f: IO[bytes], limit: int = MAX_JSON_DEPTH, chunk: int = 1 << 22) -> bool:
    """Does a JSON stream nest deeper than ``limit``? Read once, in C-speed passes: everything but
    quotes, backslashes and brackets is dropped, then strings are removed, then the bracket depth
    is a running sum. About a third of the time ijson takes to parse the same bytes; ijson itself
    (and so a parse that merely counts) would take minutes and gigabytes on 100,000 nested brackets."""
    import numpy as np

    depth, carry = 0, b""
    while block := f.read(chunk):
        data = _JSON_STRING.sub(b"", carry + block.translate(None, _NOT_STRUCTURE))
        q = data.find(b'"')  # a string still open at the end of the block: finish it with the next one
        data, carry = (data[:q], data[q:]) if q >= 0 else (data, b"")
        if data:
            a = np.frombuffer(data, dtype=np.uint8)
            run = np.cumsum(np.where((a == 91) | (a == 123), 1, -1)) + depth
            if int(run.max()) > limit:
                return True
            depth = int(run[-1])
    return False


def check_json_depth(path: Path, opener=None) -> None:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH`` before ijson reads it (``opener`` opens a
    member of an archive instead of ``path``)."""
    with (opener() if opener else open(path, "rb")) as f:
        if json_depth_exceeds(f):
            raise SourceFormatError(path, None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels: not an export "
                                    "(refused before parsing, which would take unbounded time and memory)")


def json_records(path: Path, array_keys: tuple[str, ...], quarantine: Quarantine) -> Iterator[tuple[str, int, Any]]:
    """Stream ``(key, n, record)`` from a JSON source without loading it whole.

    Accepts a top-level array (key ``""``), an object whose ``array_keys`` hold arrays, or JSONL
    where each line is a record or such an object (paginated dumps). A document that breaks off
    mid-way quarantines the rest with the record number it reached.
    """
    first = head(path, 1 << 20).lstrip()
    if not first:
        return
    if first[:1] not in (b"{", b"["):
        quarantine.add(SourceFormatError(path, 1, f"not JSON: it starts with {first[:16]!r}"), None)
        return
    line = first.split(b"\n", 1)[0]
    jsonl = False
    if first[:1] == b"{" and b"\n" in first.rstrip():
        try:
            jsonl = isinstance(orjson.loads(line), dict)
        except orjson.JSONDecodeError:
            jsonl = False
    if jsonl:
        yield from _jsonl_records(path, array_keys, quarantine)
        return
    check_json_depth(path)
    if first[:1] == b"{":
        keys = _top_level_keys(path, quarantine)
        if keys is None:
            return
        if not keys & set(array_keys):  # a single record (a memory file, one conversation): small
            yield "", 1, orjson.loads(path.read_bytes())
            return
    prefixes = ["item"] if first[:1] == b"[" else [f"{k}.item" for k in array_keys]
    for prefix in prefixes:
        n = 0
        with open(path, "rb") as f:
            try:
                for n, rec in enumerate(ijson.items(f, prefix, use_float=True), 1):
                    yield prefix.removesuffix(".item").removesuffix("item"), n, rec
            except ijson.JSONError as exc:
                quarantine.add(SourceFormatError(path, None, f"invalid JSON after record {n} of "
                                                 f"{prefix.removesuffix('.item') or 'the array'}: {exc}"), None)
                return


def _top_level_keys(path: Path, quarantine: Quarantine) -> set[str] | None:
    """The keys of a top-level JSON object, streamed; None (and quarantined) when it is not valid JSON."""
    keys = set()
    with open(path, "rb") as f:
        try:
            for prefix, event, value in ijson.parse(f):
                if prefix == "" and event == "map_key":
                    keys.add(value)
        except ijson.JSONError as exc:
            quarantine.add(SourceFormatError(path, None, f"invalid JSON: {exc}"), None)
            return None
    return keys


def bounded_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, line)`` of an open binary stream, holding at most ``MAX_LINE`` bytes of a line:
    a longer one is read past in pieces and yielded as None."""
    lineno = 0
    while line := f.readline(MAX_LINE + 1):
        lineno += 1
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield lineno, None
        else:
            yield lineno, line


def jsonl_lines(f: IO[bytes], where: str | Path, quarantine: Quarantine) -> Iterator[tuple[int, bytes, Any]]:
    """``(line number, raw line, parsed value)`` of each non-blank line of an open JSONL stream; lines
    that are not JSON, or longer than ``MAX_LINE``, are quarantined as ``where:line``."""
    for lineno, raw in bounded_lines(f):
        if raw is None:
            quarantine.add(SourceFormatError(where, lineno, f"a line longer than {MAX_LINE >> 20} MiB: not one "
                                             "memory record (left unread)"), None)
            continue
        if not raw.strip():
            continue
        try:
            yield lineno, raw, orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            quarantine.add(SourceFormatError(where, lineno, f"invalid JSON ({exc})"), raw)


def _jsonl_records(path: Path, array_keys: tuple[str, ...], quarantine: Quarantine):
    with open(path, "rb") as f:
        for lineno, _, rec in jsonl_lines(f, path, quarantine):
            pages = [k for k in array_keys if isinstance(rec, dict) and isinstance(rec.get(k), list)]
            if pages:
                for k in pages:
                    for item in rec[k]:
                        yield k, lineno, item
            else:
                yield "", lineno, rec


# [[Note]], [[Note|alias]], [[Note#Heading]], [[Note^block]] -> "Note"
WIKILINK = re.compile(r"\[\[([^\]|#^]+)(?:[#^][^\]|]*)?(?:\|[^\]]*)?\]\]")


def frontmatter(text: str) -> tuple[dict, str]:
    """Split ``---`` YAML frontmatter from a markdown body. YAML that a strict parser rejects (real
    files have unquoted colons in values) falls back to ``key: value`` lines, nested one level."""
    if not text.startswith("---"):
        return {}, text
    m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.S)
    if not m:
        return {}, text
    raw, body = m.group(1), text[m.end():]
    try:
        meta = yaml.safe_load(raw)
        if isinstance(meta, dict):
            return meta, body
    except yaml.YAMLError:
        pass
    meta: dict = {}
    parent = None
    for ln in raw.splitlines():
        km = re.match(r"^(\s*)([\w.-]+):\s*(.*)$", ln)
        if not km:
            continue
        indent, key, value = km.groups()
        if indent and isinstance(parent, dict):
            parent[key] = value.strip().strip("'\"")
        elif not value.strip():
            parent = meta[key] = {}
        else:
            meta[key], parent = value.strip().strip("'\""), None
    return meta, body


class RowBuffer:
    """Accumulates canonical rows and hands out full batches."""

    def __init__(self, origin_system: str, batch_size: int):
        self.origin_system = origin_system
        self.batch_size = batch_size
        self.adapter_name = f"palace-etl:{origin_system}"
        self._drawers: list[dict] = []
        self._vectors: dict[tuple[str, int], list[dict]] = {}  # (embedder, dim) -> rows with vectors
        self._ids: set[str] = set()
        self._entities: dict[str, dict] = {}
        self._triples: list[dict] = []

    def drawer(self, *, id: str, document: str, wing: str, room: str, source_file: str, chunk_index: int,
               origin_id: str, added_by: str = "palace-etl", hall: str | None = None,
               created_at: Any = None, updated_at: Any = None, extra: dict | None = None,
               embedding: list[float] | None = None, embedder: str | None = None,
               filed_at: str | None = None) -> bool:
        """Add a drawer; False if this batch already holds the id (the loader dedupes across batches).

        ``embedding`` + ``embedder`` carry a source's own vector (its model identity decides whether the
        loader keeps it); such rows travel in their own batches."""
        if id in self._ids:
            return False
        self._ids.add(id)
        target = self._drawers
        if embedding is not None and embedder:
            key = (embedder, len(embedding))
            target = self._vectors.setdefault(key, [])
        target.append({
            "id": id, "document": document, "wing": wing, "room": room, "source_file": source_file,
            "chunk_index": chunk_index, "added_by": added_by, "filed_at": filed_at, "hall": hall,
            "origin_system": self.origin_system, "origin_id": origin_id,
            "content_sha256": ids.content_sha256(document),
            "created_at": to_utc(created_at), "updated_at": to_utc(updated_at), "extra": extra_json(extra),
            **({"embedding": [float(x) for x in embedding]} if target is not self._drawers else {}),
        })
        return True

    def entity(self, name: str, type_: str = "unknown", properties: dict | None = None) -> None:
        eid = ids.entity_id(name)
        if eid not in self._entities:
            self._entities[eid] = {"id": eid, "name": name, "type": type_ or "unknown",
                                   "properties": orjson.dumps(properties or {}, option=orjson.OPT_SORT_KEYS).decode()}

    def triple(self, subject: str, predicate: str, obj: str, *, origin: str, valid_from: str | None = None,
               valid_to: str | None = None, confidence: float = 1.0, source_file: str | None = None,
               source_drawer_id: str | None = None, id: str | None = None, adapter_name: str | None = None) -> None:
        """A triple; ``id`` keeps a source KG's own id (another palace), else one is derived."""
        self._triples.append({
            "id": id or ids.triple_id(subject, predicate, obj, valid_from, origin), "subject": subject,
            "predicate": ids.normalize_predicate(predicate), "object": obj, "valid_from": valid_from,
            "valid_to": valid_to, "confidence": float(confidence), "source_file": source_file,
            "source_drawer_id": source_drawer_id, "adapter_name": adapter_name or self.adapter_name,
        })

    def full(self) -> bool:
        return (len(self._drawers) + sum(map(len, self._vectors.values())) >= self.batch_size
                or len(self._triples) >= self.batch_size)

    def flush(self, final: bool = False) -> Iterator[pa.RecordBatch]:
        """Yield what is buffered: drawers, triples, and (at the end only) entities."""
        if self._drawers:
            yield pa.RecordBatch.from_pylist(self._drawers, schema=drawer_schema())
        for (embedder, dim), rows in self._vectors.items():
            yield pa.RecordBatch.from_pylist(rows, schema=drawer_schema(dim, embedder))
        self._drawers, self._vectors, self._ids = [], {}, set()
        if final and self._entities:
            rows = list(self._entities.values())
            for i in range(0, len(rows), self.batch_size):
                yield pa.RecordBatch.from_pylist(rows[i:i + self.batch_size], schema=ENTITY_SCHEMA)
            self._entities = {}
        if self._triples:
            yield pa.RecordBatch.from_pylist(self._triples, schema=TRIPLE_SCHEMA)
            self._triples = []


def origin_drawer_id(wing: str, room: str, origin_system: str, origin_id: str, chunk: int = 0) -> str:
    """A drawer id from the source's own record id (MemPalace's chunk recipe, the source key as its
    file): re-importing an edited record updates its drawer instead of adding a second one."""
    return ids.drawer_id_from_chunk(wing, room, f"{origin_system}:{origin_id}", chunk)


def is_sqlite(path: Path) -> bool:
    return head(path, 16) == b"SQLite format 3\x00"


def sqlite_ro(path: Path):
    """A read-only connection to another program's SQLite database (WAL-safe, never writes)."""
    import sqlite3

    conn = sqlite3.connect(ro_uri(path), uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def tables_of(conn) -> set[str]:
    """Table and view names of an open SQLite connection."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}


def sqlite_tables(path: Path) -> set[str]:
    """Table and view names of a SQLite file (empty when it is not one)."""
    import sqlite3

    try:
        conn = sqlite_ro(path)
        try:
            return tables_of(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return set()


class Exchanges:
    """A conversation as drawers, one per exchange: a user turn and the replies that follow it
    (MemPalace's convo miner files transcripts the same way: ``> user`` then the answer)."""

    def __init__(self, buf: RowBuffer, *, wing: str, origin: str, source: str, room: str = "conversations",
                 extra: dict | None = None):
        self.buf, self.wing, self.origin, self.source, self.room = buf, wing, origin, source, room
        self.extra = extra or {}
        self.turn: dict | None = None
        self.chunk = 0

    def user(self, text: str, key: str, at: Any = None) -> None:
        self.close()
        self.turn = {"key": key, "at": at, "last": at, "lines": [f"> {text.strip()}"]}

    def reply(self, text: str, at: Any = None) -> None:
        if self.turn is not None and text and text.strip():
            self.turn["lines"].append(text.strip())
            self.turn["last"] = at or self.turn["last"]

    def close(self) -> None:
        t, self.turn = self.turn, None
        if t is None:
            return
        self.buf.drawer(id=origin_drawer_id(self.wing, self.room, self.origin, t["key"]),
                        document="\n".join(t["lines"]), wing=self.wing, room=self.room, hall="conversations",
                        source_file=self.source, chunk_index=self.chunk, origin_id=t["key"], created_at=t["at"],
                        updated_at=t["last"], extra={**self.extra, "turns": len(t["lines"])})
        self.chunk += 1


def check_source(name: str, source: Path) -> None:
    """A source is a regular file or a directory: a FIFO, socket or device would hang or read nothing."""
    try:
        st = source.stat()
    except FileNotFoundError:
        raise SourceMissing(f"import {name} {source}: no such file or directory") from None
    except OSError as exc:
        raise SourceFormatError(source, None, f"cannot read it ({exc.strerror})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise SourceFormatError(source, None, "not a regular file or directory (a FIFO, socket or device is "
                                "never read)", hint="copy the export to a regular file first")

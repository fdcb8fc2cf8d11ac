"""A collection's vectors read from a Chroma 1.5.9 palace's files, with no Chroma client.

What Chroma itself does when it opens a palace and answers ``get(include=["embeddings"])``: load the
persisted HNSW segment (``header.bin``, ``data_level0.bin``, ``length.bin`` and the id map
``index_metadata.pickle``), then replay the log tail (``embeddings_queue`` records past the vector
segment's ``max_seq_id``). In cosine space chroma-hnswlib stores each vector normalised, with its
norm in ``length.bin``, and returns ``data * length``; a replayed vector is normalised the way
hnswlib does it (float32, summed left to right) and multiplied back. Both reproduce Chroma's own
answer bit for bit (tested against a client on the same files).

Only for files no one writes while they are read: the private copy ``take_copy`` makes consistent.
Anything this module does not recognise (another space, header, encoding, a log record it cannot
place, a pickle that names a class) raises ``Untrusted``, and the caller asks Chroma instead. The
pickle is read with an unpickler that refuses every global, so it can only ever yield plain data.
"""
from __future__ import annotations

import pickle
import sqlite3
import struct
from pathlib import Path

import numpy as np
import orjson

from . import chroma_sqlite

HEADER = struct.Struct("<iQQQQQQ")  # version, offsetLevel0, max_elements, cur_element_count,
#                                     size_data_per_element, label_offset, offsetData (chroma-hnswlib)
ADD, UPDATE, UPSERT, DELETE = 0, 1, 2, 3  # embeddings_queue.operation
DELETE_MARK = 0x01  # hnswlib: flag byte 2 of an element's level-0 link list header
MAX_PICKLE = 1 << 30


class Untrusted(Exception):
    """The files are not in a shape this module reproduces exactly; read through Chroma."""


class _PlainData(pickle.Unpickler):
    def find_class(self, module, name):
        raise Untrusted(f"index_metadata.pickle names {module}.{name}; only plain data is read")


def _space(conn: sqlite3.Connection, collection: str) -> str:
    row = conn.execute("SELECT config_json_str FROM collections WHERE name = ?", (collection,)).fetchone()
    try:
        config = orjson.loads(row[0]) if row and row[0] else {}
    except orjson.JSONDecodeError:
        config = {}
    hnsw = config.get("hnsw") if isinstance(config, dict) else None
    space = hnsw.get("space") if isinstance(hnsw, dict) else None
    return space or chroma_sqlite.collection_metadata(conn, collection).get("hnsw:space") or "l2"


def _vector_segment(conn: sqlite3.Connection, collection: str) -> tuple[str, str, int]:
    """(collection id, vector segment id, dimension) of a cosine collection with a vector segment."""
    segs = chroma_sqlite.segments(conn, collection)
    row = conn.execute("SELECT id, dimension FROM collections WHERE name = ?", (collection,)).fetchone()
    if row is None or "VECTOR" not in segs or not row[1]:
        raise Untrusted(f"collection {collection}: no vector segment or no dimension")
    if _space(conn, collection) != "cosine":
        raise Untrusted(f"collection {collection}: not cosine space")
    return row[0], segs["VECTOR"], row[1]


def _normalised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hnswlib's ``normalize_vector`` on each row, in float32: (unit rows, norms)."""
    norms = np.sqrt(np.cumsum(x * x, axis=1, dtype=np.float32)[:, -1]).astype(np.float32)
    inv = (np.float32(1) / (norms + np.float32(1e-30))).astype(np.float32)
    return (x * inv[:, None]).astype(np.float32), norms


class IndexFiles:
    """The vectors of one collection of the palace at ``palace``, read once: the persisted index
    mapped read-only and the log tail applied on top, as Chroma would on opening it."""

    def __init__(self, palace: Path, conn: sqlite3.Connection, collection: str):
        self.collection = collection
        self._where = _vector_segment(conn, collection)
        _, seg, self.dim = self._where
        self._labels: dict[str, int] = {}  # the id map (id -> label); every label checked to be in the index
        self._data = self._lengths = None
        self._load_index(Path(palace) / seg)
        self._apply_tail(conn)

    def replay(self, conn: sqlite3.Connection) -> None:
        """Apply the log tail as ``conn`` reads it: a later read of the same database, when the files are
        known not to have changed in between."""
        if _vector_segment(conn, self.collection) != self._where:
            raise Untrusted(f"collection {self.collection}: recreated since its index files were read")
        self._apply_tail(conn)

    def _apply_tail(self, conn: sqlite3.Connection) -> None:
        coll_id, seg, _ = self._where
        seq = conn.execute("SELECT seq_id FROM max_seq_id WHERE segment_id = ?", (seg,)).fetchone()
        if seq and not isinstance(seq[0], int):
            raise Untrusted(f"collection {self.collection}: max_seq_id is not an integer")
        persisted = int(seq[0]) if seq else 0
        if not self._labels and persisted:
            raise Untrusted(f"collection {self.collection}: a persisted index with no id map")
        self._tail: dict[str, np.ndarray | None] = {}
        self._replay(conn, coll_id, persisted)

    def _load_index(self, seg: Path) -> None:
        header, pickled = seg / "header.bin", seg / "index_metadata.pickle"
        if not header.is_file():
            if pickled.exists():
                raise Untrusted(f"{seg}: an id map without a header")
            return
        raw = header.read_bytes()
        if len(raw) < HEADER.size:
            raise Untrusted(f"{header}: too short")
        version, off0, _cap, count, size, label_at, data_at = HEADER.unpack(raw[:HEADER.size])
        if version != 1 or label_at - data_at != 4 * self.dim or label_at + 8 > size:
            raise Untrusted(f"{header}: not a {self.dim}-d chroma-hnswlib v1 index")
        if count == 0:
            return
        if not pickled.is_file() or pickled.stat().st_size > MAX_PICKLE:
            raise Untrusted(f"{seg}: {count} elements and no usable id map")
        data_file, length_file = seg / "data_level0.bin", seg / "length.bin"
        if not data_file.is_file() or data_file.stat().st_size < count * size or \
                not length_file.is_file() or length_file.stat().st_size < count * 4:
            raise Untrusted(f"{seg}: files shorter than {count} elements")
        try:  # through a buffered reader: the unpickler then reads it in chunks, not an opcode at a time
            with open(pickled, "rb", buffering=1 << 20) as f:
                meta = _PlainData(f).load()
        except Untrusted:
            raise
        except Exception as exc:  # empty, cut short, not a pickle: whatever Chroma makes of it, not us
            raise Untrusted(f"{pickled}: not readable as an id map ({type(exc).__name__}: {exc})") from None
        id_to_label = meta.get("id_to_label") if isinstance(meta, dict) else None
        if not isinstance(id_to_label, dict):
            raise Untrusted(f"{pickled}: no id_to_label map")
        data = np.memmap(data_file, dtype=np.uint8, mode="r", shape=(count, size))
        labels = np.ascontiguousarray(data[:, label_at:label_at + 8]).view("<u8").ravel()
        flags = np.asarray(data[:, off0 + 2])
        order = np.argsort(labels, kind="stable")
        ranked = labels[order]
        if set(map(type, id_to_label)) - {str} or set(map(type, id_to_label.values())) - {int}:
            raise Untrusted(f"{pickled}: an id map entry that is not (str, int)")
        try:
            wanted = np.fromiter(id_to_label.values(), dtype=np.uint64, count=len(id_to_label))
        except OverflowError:
            raise Untrusted(f"{pickled}: an id map label out of range") from None
        at = np.searchsorted(ranked, wanted)
        if len(wanted) and (at.max() >= len(ranked) or not np.array_equal(ranked[at], wanted)):
            raise Untrusted(f"{seg}: the id map names labels the index does not hold")
        if len(ranked) > 1 and np.any(ranked[1:] == ranked[:-1]):
            raise Untrusted(f"{seg}: two elements share a label")
        if np.any(flags[order[at]] & DELETE_MARK):
            raise Untrusted(f"{seg}: the id map names a deleted element")
        self._labels, self._order, self._ranked = id_to_label, order, ranked  # positions looked up when asked
        self._data, self._data_at = data, data_at
        self._lengths = np.memmap(length_file, dtype="<f4", mode="r", shape=(count,))

    def _replay(self, conn: sqlite3.Connection, coll_id: str, persisted: int) -> None:
        live = lambda i: self._tail[i] is not None if i in self._tail else i in self._labels  # noqa: E731
        pending: list[tuple[str, bytes]] = []
        for op, i, blob, enc in conn.execute(
                "SELECT operation, id, vector, encoding FROM embeddings_queue WHERE seq_id > ? AND topic LIKE ? "
                "ORDER BY seq_id", (persisted, f"%/{coll_id}")):
            if op == DELETE:
                if live(i):
                    self._tail[i] = None
                continue
            if blob is None:
                if op == UPDATE and live(i):
                    continue  # a metadata-only update keeps the vector
                raise Untrusted(f"log record for {i!r}: no vector (operation {op})")
            if enc != "FLOAT32" or len(blob) != 4 * self.dim:
                raise Untrusted(f"log record for {i!r}: a {enc} vector of {len(blob)} bytes")
            if op not in (ADD, UPDATE, UPSERT) or (op == ADD and live(i)) or (op == UPDATE and not live(i)):
                raise Untrusted(f"log record for {i!r}: operation {op} Chroma would not simply apply")
            self._tail[i] = blob  # type: ignore[assignment]
            pending.append((i, blob))
        if pending:
            unit, norms = _normalised(np.frombuffer(b"".join(b for _, b in pending), dtype="<f4").reshape(-1, self.dim))
            for (i, blob), u, n in zip(pending, unit, norms):
                if self._tail[i] is blob:
                    self._tail[i] = u * n

    def vectors(self, ids: list[str]) -> np.ndarray:
        """The vectors of ``ids`` (all of which must be live), as a float32 array in that order."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        from_index: list[tuple[int, int]] = []
        for k, i in enumerate(ids):
            if i in self._tail:
                v = self._tail[i]
                if v is None:
                    raise Untrusted(f"{i!r}: deleted in the log")
                out[k] = v
            elif i in self._labels:
                from_index.append((k, self._labels[i]))
            else:
                raise Untrusted(f"{i!r}: in no index file and no log record")
        if from_index:
            ks, labels = zip(*from_index)
            rows = np.fromiter(ks, dtype=np.int64, count=len(ks))
            pos = self._order[np.searchsorted(self._ranked, np.fromiter(labels, dtype=np.uint64, count=len(labels)))]
            order = np.argsort(pos)  # read the mapped file front to back
            stored = np.ascontiguousarray(self._data[pos[order], self._data_at:self._data_at + 4 * self.dim])
            unit = stored.view("<f4")
            norms = np.linalg.norm(unit, axis=1)
            if np.any(np.abs(norms - 1) > 1e-3):
                raise Untrusted("stored vectors that are not unit vectors (not a cosine index as assumed)")
            out[rows[order]] = unit * np.asarray(self._lengths[pos[order]])[:, None]
        return out

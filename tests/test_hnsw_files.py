"""Vectors read from a palace's files (``palace.hnsw_files``) are exactly what Chroma's own ``get``
returns on the same files, in every state the log and the index can be in; anything the reader does
not recognise is refused and read through Chroma instead, with the same answer."""
from __future__ import annotations

import os
import pickle
import sqlite3
import struct
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from palace.chroma_sqlite import open_ro
from palace.hnsw_files import IndexFiles, Untrusted
from palace.layout import HNSW_METADATA, layout_for
from palace.stores.chroma import ChromaStore
from palace.stores.chroma_dir import ChromaDirReader


def _collection(palace: Path, name: str = "mempalace_drawers", space: str = "cosine"):
    client = chromadb.PersistentClient(str(palace), settings=Settings(anonymized_telemetry=False))
    return client.get_or_create_collection(name, metadata=dict(HNSW_METADATA) | {"hnsw:space": space})


def _vectors(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 384)) * 3).astype(np.float32)  # not unit vectors


def _a_palace_with_history(palace: Path) -> None:
    """Past Chroma's persist threshold (1,000 records) and then a log tail holding every kind of
    write: upserts of new and existing rows, updates with and without a vector, deletes, a row
    deleted and added again, and writes to a second collection."""
    col = _collection(palace)
    for s in range(0, 2600, 650):
        col.upsert(ids=[f"d{i}" for i in range(s, s + 650)], embeddings=_vectors(650, s),
                   documents=[f"memory {i}" for i in range(s, s + 650)],
                   metadatas=[{"wing": f"w{i % 3}", "n": i, "f": i / 7, "b": i % 2 == 0} for i in range(s, s + 650)])
    col.upsert(ids=["d5", "new1"], embeddings=_vectors(2, 99), documents=["changed", "new"])
    col.update(ids=["d7"], metadatas=[{"wing": "moved"}])  # no vector: keeps its own
    col.update(ids=["d8"], embeddings=_vectors(1, 98))
    col.delete(ids=["d9", "d2599"])
    col.add(ids=["d9"], embeddings=_vectors(1, 97), documents=["back again"])
    col.delete(ids=["d10"])  # persisted in the index, deleted in the tail
    closets = _collection(palace, "mempalace_closets")
    closets.upsert(ids=["c1", "c2"], embeddings=_vectors(2, 96), documents=["a", "b"])


def _through_chroma(palace: Path, table: str) -> dict[str, dict]:
    """What a Chroma client on the same files answers (the old path every read took)."""
    store = ChromaStore(layout_for(palace, private=True))
    store.root = None  # a ChromaStore has no root of its own; _existing only needs it defined
    lister = ChromaDirReader(layout_for(palace))
    try:
        ids = [i for page in lister.rows(table, ()) for i, _, _ in page]
        return {r["id"]: r for page in ChromaStore.fetch(store, table, ids) for r in page}
    finally:
        lister.close()
        store.close()


def _same(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert set(a) == set(b) and a
    for i, r in a.items():
        assert (r["document"], r["metadata"]) == (b[i]["document"], b[i]["metadata"]), i
        assert np.array_equal(np.asarray(r["embedding"], dtype=np.float32),
                              np.asarray(b[i]["embedding"], dtype=np.float32)), i


def test_vectors_from_the_files_are_chromas_own_bit_for_bit(tmp_path):
    palace = tmp_path / "palace"
    _a_palace_with_history(palace)
    with open_ro(palace / "chroma.sqlite3") as conn:
        tail = conn.execute("SELECT count(*) FROM embeddings_queue").fetchone()[0]
    assert tail > 5  # the state under test: an index persisted, and a log tail past it
    reader = ChromaDirReader(layout_for(palace))
    seen = {}
    try:
        for table in ("drawers", "closets"):
            ids = [i for page in reader.rows(table, ()) for i, _, _ in page]
            fetched = {r["id"]: r for page in reader.fetch(table, ids) for r in page}
            scanned = {r["id"]: r for page in reader.scan(table) for r in page}
            view = reader._copy()
            assert view.untrusted == {} and view._vectors == {}  # no Chroma client was opened
            expected = _through_chroma(view.path, table)
            _same(fetched, expected)
            _same(scanned, expected)
            seen[table] = scanned
        assert seen["closets"].keys() == {"c1", "c2"}
        drawers = seen["drawers"]
        assert "d10" not in drawers and "d2599" not in drawers and drawers["d9"]["document"] == "back again"
        assert drawers["d7"]["metadata"] == {"wing": "moved", "n": 7, "f": 1.0, "b": False}
    finally:
        reader.close()


def _export_matches_chroma(palace: Path, reason: str) -> None:
    reader = ChromaDirReader(layout_for(palace))
    try:
        scanned = {r["id"]: r for page in reader.scan("drawers") for r in page}
        view = reader._copy()
        assert reason in view.untrusted.get("drawers", "")
        _same(scanned, _through_chroma(view.path, "drawers"))
    finally:
        reader.close()


def test_an_index_in_another_space_is_read_through_chroma(tmp_path):
    palace = tmp_path / "palace"
    _collection(palace, space="l2").upsert(ids=[f"d{i}" for i in range(1200)], embeddings=_vectors(1200, 1),
                                           documents=["x"] * 1200)
    _export_matches_chroma(palace, "not cosine space")


def test_a_vector_the_files_cannot_reproduce_sends_the_rest_of_a_scan_through_chroma(tmp_path):
    palace = tmp_path / "palace"
    col = _collection(palace)
    col.upsert(ids=[f"d{i:04d}" for i in range(1200)], embeddings=_vectors(1200, 2), documents=["x"] * 1200)
    vecs = _vectors(6000, 3)
    vecs[5500] = 0  # a zero vector is stored unnormalised: not what the reader assumes of a cosine index
    for s in range(0, 6000, 3000):  # the first page of the scan (5,000 rows) is read from the files
        col.upsert(ids=[f"e{i:04d}" for i in range(s, s + 3000)], embeddings=vecs[s:s + 3000], documents=["y"] * 3000)
    _export_matches_chroma(palace, "not unit vectors")


def _segment(palace: Path) -> Path:
    return next(p.parent for p in palace.glob("*/index_metadata.pickle"))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_an_id_map_that_names_code_is_refused_without_running_it(tmp_path):
    palace = tmp_path / "palace"
    _collection(palace).upsert(ids=[f"d{i}" for i in range(1200)], embeddings=_vectors(1200, 4), documents=["x"] * 1200)
    marker = tmp_path / "ran"
    (_segment(palace) / "index_metadata.pickle").write_bytes(pickle.dumps({"id_to_label": _Payload(str(marker))}))
    with open_ro(palace / "chroma.sqlite3") as conn, pytest.raises(Untrusted, match="posix.mkdir|os.mkdir"):
        IndexFiles(palace, conn, "mempalace_drawers")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["short data file", "count past the files", "label missing", "empty id map",
                                    "label not an int", "negative label"])
def test_index_files_that_do_not_add_up_are_refused(tmp_path, damage):
    palace = tmp_path / "palace"
    _collection(palace).upsert(ids=[f"d{i}" for i in range(1200)], embeddings=_vectors(1200, 5), documents=["x"] * 1200)
    seg = _segment(palace)
    if damage == "short data file":
        os.truncate(seg / "data_level0.bin", 1000)
    elif damage == "count past the files":
        raw = bytearray((seg / "header.bin").read_bytes())
        version, off0, cap, count, size, label, data = struct.unpack_from("<iQQQQQQ", raw)
        struct.pack_into("<iQQQQQQ", raw, 0, version, off0, cap, cap * 10, size, label, data)
        (seg / "header.bin").write_bytes(bytes(raw))
    elif damage == "empty id map":
        (seg / "index_metadata.pickle").write_bytes(b"")
    else:
        meta = pickle.loads((seg / "index_metadata.pickle").read_bytes())
        meta["id_to_label"]["d0"] = {"label missing": 10 ** 9, "label not an int": True, "negative label": -1}[damage]
        (seg / "index_metadata.pickle").write_bytes(pickle.dumps(meta))
    with sqlite3.connect(palace / "chroma.sqlite3") as conn, pytest.raises(Untrusted):
        IndexFiles(palace, conn, "mempalace_drawers")

"""One contract, every store kind (as restic runs one suite over every backend): a palace
directory, a ``chroma run`` server on 127.0.0.1, a bundle directory, and a pgvector palace on a
real PostgreSQL. A new store passes this
before anything else uses it."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from palace.errors import EmbedderMismatch
from palace.identity import EmbedderIdentity
from palace.rows import TABLES, table_row_hash
from palace.stores import (
    BundleDirStore,
    ChromaDirStore,
    ChromaServerStore,
    PgVectorStore,
    SyncState,
    open_store,
)

MINILM = EmbedderIdentity("minilm", 384)
ROOT = Path(__file__).resolve().parent.parent


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def drawers(n: int, seed: int = 1, prefix: str = "d") -> list[dict]:
    vecs = unit(n, seed)
    return [{"id": f"{prefix}{i:06d}", "document": f"memory {i} of seed {seed}",
             "metadata": {"wing": f"w{i % 3}", "room": f"r{i % 5}", "chunk_index": i, "score": i / 7},
             "embedding": vecs[i]} for i in range(n)]


def kg_rows() -> dict[str, list[dict]]:
    entities = [{"id": f"e{i}", "name": f"entity {i}", "type": "thing", "properties": "{}",
                 "created_at": "2026-01-01 00:00:00"} for i in range(4)]
    triples = [{"id": f"t{i}", "subject": f"e{i}", "predicate": "knows", "object": f"e{(i + 1) % 4}",
                "valid_from": None, "valid_to": None, "confidence": 1.0, "source_closet": None,
                "source_file": None, "source_drawer_id": None, "adapter_name": "test",
                "extracted_at": "2026-01-01 00:00:00"} for i in range(4)]
    return {"entities": entities, "triples": triples}


@pytest.fixture(params=["chroma", "chroma-server", "bundle", "pgvector"])
def spec(request, tmp_path):
    """The spelling of a new, empty store of each kind (and its KG file where it needs one)."""
    if request.param == "chroma":
        yield str(tmp_path / "palace"), None
        return
    if request.param == "pgvector":
        request.getfixturevalue("pgvector_env")  # MEMPALACE_BACKEND=pgvector: a new directory is one
        yield str(tmp_path / "palace"), None
        return
    if request.param == "bundle":
        yield f"bundle:{tmp_path / 'bundles'}", None
        return
    url = request.getfixturevalue("shared_chroma_server")
    yield url, tmp_path / "kg" / "knowledge_graph.sqlite3"
    import chromadb

    client = chromadb.HttpClient(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]))
    for col in client.list_collections():
        client.delete_collection(col.name)


def opened(spec):
    return open_store(*spec)


def write_all(store, rows: list[dict], kg: dict | None = None) -> None:
    store.claim_identity(MINILM)
    store.write("drawers", rows)
    store.write("closets", rows[:3])
    for table, kg_table_rows in (kg or {}).items():
        store.write(table, kg_table_rows)
    store.commit()


def test_the_factory_opens_each_kind(spec):
    store = opened(spec)
    expected = {"chroma": ChromaDirStore, "chroma-server": ChromaServerStore, "bundle": BundleDirStore,
                "pgvector": PgVectorStore}
    assert isinstance(store, expected[store.kind])
    assert not store.exists() and store.is_empty()
    assert store.snapshot() == {t: {} for t in TABLES}
    assert store.identity() is None and store.info("drawers") is None
    store.close()


def test_round_trip_with_vectors(spec):
    rows, kg = drawers(60), kg_rows()
    store = opened(spec)
    write_all(store, rows, kg)
    store.close()
    store = opened(spec)  # what another process opening it would see
    try:
        assert store.exists() and store.identity() == MINILM
        snap = store.snapshot()
        assert snap["drawers"] == {r["id"]: table_row_hash("drawers", r) for r in rows}
        assert snap["closets"] == {r["id"]: table_row_hash("closets", r) for r in rows[:3]}
        for table in ("entities", "triples"):
            assert set(snap[table]) == {r["id"] for r in kg[table]}
        assert store.counts() == {"drawers": 60, "closets": 3, "entities": 4, "triples": 4}
        info = store.info("drawers")
        assert info.count == 60 and info.dimension == 384 and info.settings.get("hnsw:space") == "cosine"
        got = {r["id"]: r for page in store.fetch("drawers", [r["id"] for r in rows][::-1]) for r in page}
        assert set(got) == {r["id"] for r in rows}
        for r in rows:
            assert got[r["id"]]["document"] == r["document"] and got[r["id"]]["metadata"] == r["metadata"]
            assert np.allclose(np.asarray(got[r["id"]]["embedding"], dtype=np.float32), r["embedding"], atol=1e-6)
        scanned = {r["id"]: r for page in store.scan("drawers") for r in page}  # every row, read once
        assert set(scanned) == set(got)
        for i, r in scanned.items():
            assert (r["document"], r["metadata"]) == (got[i]["document"], got[i]["metadata"])
            assert np.array_equal(np.asarray(r["embedding"], dtype=np.float32),
                                  np.asarray(got[i]["embedding"], dtype=np.float32))
        for table in ("entities", "triples"):
            assert sorted(r["id"] for page in store.scan(table) for r in page) == sorted(snap[table])
        listed = [row for page in store.rows("drawers", ("wing",)) for row in page]
        assert sorted(i for i, _, _ in listed) == sorted(r["id"] for r in rows)
        assert all(set(m) == {"wing"} for _, _, m in listed)
        texts = {i: d for page in store.rows("drawers", ("document",)) for i, d, _ in page}
        assert texts == {r["id"]: r["document"] for r in rows}
        nearest = store.nearest("drawers", np.stack([r["embedding"] for r in rows[:5]]), 3)
        assert [ids[0] for ids, _ in nearest] == [r["id"] for r in rows[:5]]
        assert not list(store.fetch("drawers", ["no-such-id"]))  # absent ids are simply absent
    finally:
        store.close()


def test_deletes_and_rewrites(spec):
    rows = drawers(40)
    store = opened(spec)
    write_all(store, rows, kg_rows())
    known, marks, _ = store.changes({}, None)
    assert known == store.snapshot()
    store.delete("drawers", [r["id"] for r in rows[:10]] + ["never-there"])
    store.delete("triples", ["t0"])
    edited = dict(rows[10], document="an edited memory", metadata={"wing": "w1"})  # keys dropped, not kept
    store.write("drawers", [edited])
    store.commit()
    store.close()
    store = opened(spec)
    try:
        snap = store.snapshot()
        assert set(snap["drawers"]) == {r["id"] for r in rows[10:]}
        assert snap["drawers"][edited["id"]] == table_row_hash("drawers", edited)
        assert "t0" not in snap["triples"] and len(snap["triples"]) == 3
        assert not [r for page in store.fetch("drawers", [rows[0]["id"]]) for r in page]
        read: list[str] = []
        hashes = getattr(store, "_hashes", None)
        if hashes is not None:  # a spy on what changes() reads, around the real method
            store._hashes = lambda table, ids: (read.extend(ids), hashes(table, ids))[1]
        state, now, why = store.changes(known, marks)
        assert state == snap  # the change marks find exactly what re-reading every row finds
        if store.kind in ("chroma", "pgvector"):  # the stores that keep marks read only the edited row
            assert why is None and now is not None and read == [edited["id"]]
            read.clear()
            assert store.changes(state, now)[0] == snap and read == []
        else:
            assert marks is None and now is None and why
    finally:
        store.close()


def test_another_embedders_vectors_are_refused(spec):
    store = opened(spec)
    write_all(store, drawers(5))
    with pytest.raises(EmbedderMismatch):
        store.claim_identity(EmbedderIdentity("openai-compat", 768))
    store.claim_identity(MINILM)  # the same identity again is fine
    assert store.identity() == MINILM
    store.close()


def test_sync_state_round_trip(spec):
    store = opened(spec)
    write_all(store, drawers(3))
    saved = SyncState({"drawers": {"d000000": "h"}}, {"drawers": {"d000001": ["old"]}}, {"triples": {"t9": "2026"}})
    store.save_sync_state(saved)
    store.close()
    assert dataclasses.replace(opened(spec).sync_state(), position=None) == saved  # the position is the store's own


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from palace.identity import EmbedderIdentity
    from palace.stores import open_store
    spec, kg, n = sys.argv[1], (sys.argv[2] or None), int(sys.argv[3])
    store = open_store(spec, kg)
    store.claim_identity(EmbedderIdentity("minilm", 384))
    vecs = np.random.default_rng(1).standard_normal((n, 384)).astype(np.float32)
    for s in range(0, n, 200):
        store.write("drawers", [{"id": f"d{i:06d}", "document": f"memory {i}", "metadata": {"wing": "w"},
                                 "embedding": vecs[i] / np.linalg.norm(vecs[i])} for i in range(s, min(n, s + 200))])
        store.commit()
        print(s, flush=True)
""")


def test_an_interrupted_write_re_runs_clean(spec, tmp_path):
    """SIGKILL a writer after its first committed chunk (mid-way through the next), then re-run the
    whole write: the store holds exactly the rows, once, and nothing half-written is left."""
    n = 2000
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, spec[0], str(spec[1] or ""), str(n)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "0"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    rerun = subprocess.run([sys.executable, "-c", WRITER, spec[0], str(spec[1] or ""), str(n)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    store = opened(spec)
    try:
        store.verified()
        snap = store.snapshot()["drawers"]
        assert sorted(snap) == [f"d{i:06d}" for i in range(n)] and store.counts()["drawers"] == n
        probe = [r for page in store.fetch("drawers", ["d000007", "d001999"]) for r in page]
        assert [ids[0] for ids, _ in store.nearest("drawers", np.stack([r["embedding"] for r in probe]), 2)] \
            == [r["id"] for r in probe]
    finally:
        store.close()
    if spec[0].startswith("bundle:"):
        left = [p.name for p in Path(spec[0].removeprefix("bundle:")).iterdir() if p.name.startswith(".tmp-")]
        assert not left


@pytest.mark.slow
def test_paging_past_chromas_get_limit(spec):
    """More rows than one Chroma ``get`` may return (32,766): every read pages."""
    n = 33_000
    store = opened(spec)
    store.claim_identity(MINILM)
    for s in range(0, n, 5000):
        store.write("drawers", drawers(min(5000, n - s), seed=s, prefix=f"p{s:05d}_"))
    store.commit()
    store.close()
    store = opened(spec)
    try:
        snap = store.snapshot()["drawers"]
        assert len(snap) == n and store.counts()["drawers"] == n
        assert sum(len(page) for page in store.rows("drawers", ())) == n
        assert sum(len(page) for page in store.fetch("drawers", list(snap), vectors=False)) == n
    finally:
        store.close()

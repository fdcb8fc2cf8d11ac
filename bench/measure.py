"""One measurement per process: ``python -m bench.measure NAME JSON_ARGS`` prints one JSON result.

Each result has ``seconds`` (wall time of the measured part only), ``rows`` and the
process's own ``peak_rss_mb``. Running each in a fresh process keeps peak RSS
per measurement honest and caches from one measurement out of the next.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import orjson


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _docs(path: str) -> list[str]:
    return orjson.loads(Path(path).read_bytes())


def documents(workload: str, out: str) -> dict:
    """Parse the workload through the importer (no palace): the exact documents a migration embeds."""
    from importers.base import ImportOptions
    from importers.mcp_memory import McpMemoryImporter
    from importers.quarantine import Quarantine
    from importers.schema import DRAWERS, batch_kind

    t = time.perf_counter()
    docs = []
    for f in sorted(Path(workload).glob("mcp-*.jsonl")):
        wing = f.stem.removeprefix("mcp-")
        for b in McpMemoryImporter().batches(f, ImportOptions(wing=wing), Quarantine()):
            if batch_kind(b) == DRAWERS:
                docs += b.column("document").to_pylist()
    Path(out).write_bytes(orjson.dumps(docs))
    return {"seconds": time.perf_counter() - t, "rows": len(docs)}


def embed_ours(docs: str, limit: int = 0, vectors_out: str = "") -> dict:
    from etl.embed import MiniLMEmbedder

    texts = _docs(docs)[:limit or None]
    emb = MiniLMEmbedder()
    t = time.perf_counter()
    vecs = emb.embed(texts)
    secs = time.perf_counter() - t
    if vectors_out:
        np.save(vectors_out, vecs)
    return {"seconds": secs, "rows": len(texts)}


def embed_chroma_default(docs: str, limit: int, palace: str) -> dict:
    """MemPalace's path: Chroma's DefaultEmbeddingFunction embedding inside collection.upsert."""
    import chromadb
    from chromadb.utils.embedding_functions import DefaultEmbeddingFunction

    texts = _docs(docs)[:limit]
    col = chromadb.PersistentClient(palace).get_or_create_collection(
        "mempalace_drawers", metadata={"hnsw:space": "cosine", "hnsw:num_threads": 1},
        embedding_function=DefaultEmbeddingFunction())
    t = time.perf_counter()
    for s in range(0, len(texts), 100):  # MemPalace files drawers in calls of this order
        chunk = texts[s:s + 100]
        col.upsert(ids=[f"d{s + i}" for i in range(len(chunk))], documents=chunk)
    return {"seconds": time.perf_counter() - t, "rows": len(texts)}


def _raw_target(palace: str):
    """A raw chromadb drawers collection in ``palace`` (MemPalace's HNSW settings), and its max batch."""
    import chromadb

    from palace.layout import HNSW_METADATA

    client = chromadb.PersistentClient(palace)
    col = client.get_or_create_collection("mempalace_drawers", metadata=dict(HNSW_METADATA),
                                          embedding_function=None)
    return col, client.get_max_batch_size()


def _page_all(palace: str, include: list[str]) -> int:
    """Raw chromadb: page a palace's whole drawers collection with get(limit, offset); rows read."""
    import chromadb

    col = chromadb.PersistentClient(palace).get_collection("mempalace_drawers")
    return sum(len(col.get(include=include, limit=5000, offset=off)["ids"]) for off in range(0, col.count(), 5000))


def upsert_raw(docs: str, vectors: str, palace: str) -> dict:
    """Raw chromadb upsert of precomputed vectors at max_batch_size (the irreducible write cost)."""
    texts, vecs = _docs(docs), np.load(vectors)
    col, step = _raw_target(palace)
    t = time.perf_counter()
    for s in range(0, len(texts), step):
        n = len(texts[s:s + step])
        col.upsert(ids=[f"drawer_{s + i}" for i in range(n)], documents=texts[s:s + step],
                   metadatas=[{"wing": "w", "room": "r", "source_file": "f", "chunk_index": s + i, "added_by": "b",
                               "filed_at": "2026-01-01T00:00:00"} for i in range(n)],
                   embeddings=vecs[s:s + step])
    return {"seconds": time.perf_counter() - t, "rows": len(texts)}


def upsert_same_rows_raw(source: str, palace: str) -> dict:
    """Raw chromadb upsert, at max_batch_size, of exactly the rows of the palace ``source`` (ids,
    documents, every metadata key, vectors; read beforehand, untimed): the floor of a restore or a
    sync of those rows, which write the same metadata (Chroma's cost grows with the keys per row)."""
    import chromadb

    src = chromadb.PersistentClient(source).get_collection("mempalace_drawers")
    got = src.get(include=["documents", "metadatas", "embeddings"], limit=src.count())
    col, step = _raw_target(palace)
    t = time.perf_counter()
    for s in range(0, len(got["ids"]), step):
        col.upsert(ids=got["ids"][s:s + step], documents=got["documents"][s:s + step],
                   metadatas=got["metadatas"][s:s + step], embeddings=got["embeddings"][s:s + step])
    return {"seconds": time.perf_counter() - t, "rows": len(got["ids"])}


def migrate(workload: str, palace: str, source: str = "mcp-memory") -> dict:
    """The real migration through run_import (parse, embed, load, KG): every per-wing MCP memory
    file, or (``source="mem0"``) the one mem0 export file holding the same memories."""
    from etl.embed import MINILM, MiniLMEmbedder
    from etl.load import run_import
    from importers.base import ImportOptions
    from importers.registry import get_importer
    from palace.stores import open_store

    emb = {}

    def factory():  # one model load for the whole migration (setdefault would build one per file)
        if "e" not in emb:
            emb["e"] = MiniLMEmbedder()
        return emb["e"]
    t = time.perf_counter()
    totals = {"drawers_written": 0, "drawers_unchanged": 0, "kg_rows_written": 0, "vectors_embedded": 0}
    runs = ([(f, ImportOptions(wing=f.stem[4:])) for f in sorted(Path(workload).glob("mcp-*.jsonl"))]
            if source == "mcp-memory" else [(Path(workload) / "mem0.json", ImportOptions())])
    for f, options in runs:
        r = run_import(get_importer(source), f, open_store(palace), options, factory, MINILM, progress=False)
        for k in totals:
            totals[k] += getattr(r, k)
    return {"seconds": time.perf_counter() - t, "rows": totals["drawers_written"] + totals["drawers_unchanged"],
            **totals}


def export_palace(palace: str, out: str, encrypt_to: str = "", incremental: bool = False) -> dict:
    from exporters.bundle import export_bundle
    from palace.crypt import Sealer
    from palace.stores import open_store

    t = time.perf_counter()
    store = open_store(palace, read_only=True)  # what `palace-etl export` opens
    try:
        r = export_bundle(store, Path(out), incremental=incremental,
                          sealer=Sealer([encrypt_to]) if encrypt_to else None)
    finally:
        store.close()
    return {"seconds": time.perf_counter() - t, "rows": r.counts["drawers"], "bundle": r.bundle}


def age_key(out: str) -> dict:
    """A fresh age identity at ``out``; its public key."""
    from palace.crypt import new_identity

    return {"seconds": 0.0, "rows": 0, "public": new_identity(Path(out))}


def nightly_changes(palace: str, drawers: int) -> dict:
    """A day of an agent's work on a palace of ``drawers``: 1% of them changed -- 0.5% re-worded
    (vectors kept: only what follows is measured), 0.2% removed, the rest of the 1% added (copies of
    others' vectors)."""
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    edits, deletes = max(1, drawers // 200), max(1, drawers // 500)
    adds = drawers // 100 - edits - deletes

    store = VectorStore(layout_for(palace), lock_timeout=300)
    t = time.perf_counter()
    first = [row[1] for _, row in zip(range(edits + deletes), store.scan(include=(), page=edits + deletes))]
    got = store.get(first, include=["documents", "metadatas", "embeddings"])
    ids, docs, metas, vecs = got["ids"], got["documents"], got["metadatas"], np.asarray(got["embeddings"])
    store.upsert(ids[:edits], [d + " (revised tonight)" for d in docs[:edits]], metas[:edits], vecs[:edits])
    store.upsert([f"drawer_tonight_{i:05d}" for i in range(adds)], [f"learned tonight, note {i}" for i in range(adds)],
                 [metas[i % edits] for i in range(adds)], vecs[[i % edits for i in range(adds)]])
    store.delete(ids[edits:edits + deletes])
    store.close()
    return {"seconds": time.perf_counter() - t, "rows": edits + deletes + adds}


def diff_points(a: str, b: str) -> dict:
    from etl.diff import run_diff

    t = time.perf_counter()
    r = run_diff(a, b)
    c = r.counts()["drawers"]
    return {"seconds": time.perf_counter() - t, "rows": c["added"] + c["removed"] + c["edited"]}


def read_both_raw(a: str, b: str) -> dict:
    """Raw chromadb: page both palaces' documents and metadata (what a diff by re-reading needs)."""
    t = time.perf_counter()
    rows = sum(_page_all(palace, ["documents", "metadatas"]) for palace in (a, b))
    return {"seconds": time.perf_counter() - t, "rows": rows}


def build_palace(palace: str, n: int, seed: int = 5) -> dict:
    """A palace of ``n`` drawers with realistic text and metadata and precomputed unit vectors (no embedding)."""
    import random

    from bench.generate import _text
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    r = random.Random(seed)
    store = VectorStore(layout_for(palace), lock_timeout=300)
    t = time.perf_counter()
    for s in range(0, n, 5000):
        k = min(5000, n - s)
        v = np.random.default_rng(seed + s).standard_normal((k, 384)).astype(np.float32)
        store.upsert([f"drawer_big_{i:07d}" for i in range(s, s + k)], [_text(r) for _ in range(k)],
                     [{"wing": f"w{i % 15}", "room": f"r{i % 8}", "source_file": f"/data/f{i // 50}.md",
                       "chunk_index": i % 50, "added_by": "bench", "filed_at": "2026-11-24T03:00:00"}
                      for i in range(s, s + k)], v / np.linalg.norm(v, axis=1, keepdims=True))
    store.close()
    return {"seconds": time.perf_counter() - t, "rows": n}


def verify_pair(a: str, b: str) -> dict:
    """``verify --palace A --palace B``: parity of two replicas (row hashes, sampled vectors; no
    retrieval probes: the scale palaces' vectors are random)."""
    from etl.verify import verify_parity

    t = time.perf_counter()
    r = verify_parity(a, b, probes=0)
    return {"seconds": time.perf_counter() - t, "rows": 0, "problems": len(r.findings)}


def get_paging_raw(palace: str) -> dict:
    """Raw chromadb: page the whole collection with get(limit, offset), vectors included."""
    import chromadb

    col = chromadb.PersistentClient(palace).get_collection("mempalace_drawers")
    n = col.count()
    t = time.perf_counter()
    rows = 0
    for off in range(0, n, 5000):
        rows += len(col.get(include=["documents", "metadatas", "embeddings"], limit=5000, offset=off)["ids"])
    return {"seconds": time.perf_counter() - t, "rows": rows}


def restore_palace(bundle: str, palace: str) -> dict:
    from exporters.restore import restore_bundle
    from palace.stores import open_store

    t = time.perf_counter()
    r = restore_bundle(Path(bundle), open_store(palace))
    return {"seconds": time.perf_counter() - t, "rows": r.rows.get("drawers", 0)}


def verify_against(workload: str, palace: str) -> dict:
    """verify --against every source file of the workload in one run (parity only: no retrieval probes)."""
    from etl.verify import verify_palace
    from palace.stores import open_store

    t = time.perf_counter()
    sources = [("mcp-memory", f) for f in sorted(Path(workload).glob("mcp-*.jsonl"))]
    problems = len(verify_palace(open_store(palace), against=sources, probes=0).findings)
    return {"seconds": time.perf_counter() - t, "rows": 0, "problems": problems}


def _triples(n: int) -> list[tuple]:
    return [(f"t_s{i % 997}_rel_o{i}_{i:012d}", f"Subject {i % 997}", f"rel{i % 7}", f"Object {i}", "2026-01-01",
             None, 1.0, "bench", None, "bench") for i in range(n)]


def kg_bulk(path: str, n: int) -> dict:
    from palace.kg import KnowledgeGraph

    rows = _triples(n)
    t = time.perf_counter()
    with KnowledgeGraph(path) as kg:
        for s in range(0, n, 1000):
            kg.write_batch([], rows[s:s + 1000])
    return {"seconds": time.perf_counter() - t, "rows": n}


def kg_mempalace(path: str, n: int) -> dict:
    """MemPalace's own KnowledgeGraph.add_triple loop: one deferred transaction per call."""
    from mempalace.knowledge_graph import KnowledgeGraph

    rows = _triples(n)
    kg = KnowledgeGraph(path)
    t = time.perf_counter()
    for r in rows:
        kg.add_triple(r[1], r[2], r[3], valid_from=r[4], source_file=r[7])
    secs = time.perf_counter() - t
    kg.close()
    return {"seconds": secs, "rows": n}


def kg_writer(path: str, tag: str, n: int) -> dict:
    from palace.kg import KnowledgeGraph

    errors = 0
    t = time.perf_counter()
    with KnowledgeGraph(path) as kg:
        for i in range(n):
            try:
                kg.write_batch([], [(f"t_{tag}_{i}", f"{tag} {i}", "wrote", "bench", None, None, 1.0, None, None,
                                     "bench")])
            except Exception:
                errors += 1
    return {"seconds": time.perf_counter() - t, "rows": n, "errors": errors}


def sync_palace(a: str, b: str) -> dict:
    from etl.sync import run_sync

    t = time.perf_counter()
    r = run_sync(a, b)
    return {"seconds": time.perf_counter() - t, "rows": r.moved, "converged": r.converged}


def drawer_writer(palace: str, tag: str, n: int, seed: int, pause: float = 0.0) -> dict:
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    vecs = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = VectorStore(layout_for(palace), lock_timeout=300)
    errors = 0
    t = time.perf_counter()
    for s in range(0, n, 200):
        ids = [f"{tag}_{i}" for i in range(s, min(n, s + 200))]
        try:
            store.upsert(ids, ids, [{"wing": "bench", "room": tag}] * len(ids), vecs[s:s + len(ids)])
        except Exception:
            errors += 1
        time.sleep(pause)  # bursts, like an agent filing memories, not one tight loop
    store.close()
    return {"seconds": time.perf_counter() - t, "rows": n, "errors": errors}


def reader(palace: str, seconds: float) -> dict:
    """Our reader (rate-limited refresh) and, alongside, what a 3.3.6-style reader would do.

    The 3.3.6 policy re-creates the client whenever the chroma.sqlite3 mtime moved since the
    last read; re-opening during writes can tear the index, so that policy is counted
    (every read stats the file), not executed.
    """
    from palace.layout import layout_for
    from palace.vectors import VectorStore, db_stamp

    store = VectorStore(layout_for(palace), lock_timeout=300)
    db = Path(palace) / "chroma.sqlite3"
    naive, last, reads = 0, db_stamp(db), 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        store.reading().count()
        reads += 1
        now = db_stamp(db)
        if now != last:
            naive += 1
            last = now
        time.sleep(0.05)
    creations = store.client_creations
    store.close()
    return {"seconds": seconds, "rows": reads, "client_creations": creations, "naive_recreations": naive}


def copy_raw(palace: str, dsn: str) -> dict:
    """Raw psycopg ``COPY`` of a Chroma palace's drawers (ids, documents, metadata, vectors, read and
    formatted before the clock starts) into a fresh table of MemPalace's pgvector layout."""
    import psycopg

    from palace.stores import open_store

    store = open_store(palace, read_only=True)
    ids = [i for page in store.rows("drawers", ()) for i, _, _ in page]
    rows = [(r["id"], r["document"], orjson.dumps(r["metadata"], option=orjson.OPT_SORT_KEYS).decode(),
             "[" + ",".join(map(repr, np.asarray(r["embedding"], dtype=np.float32).tolist())) + "]")
            for page in store.fetch("drawers", ids) for r in page]
    store.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("DROP TABLE IF EXISTS bench_copy_raw")
        conn.execute("CREATE TABLE bench_copy_raw (id text PRIMARY KEY, document text NOT NULL DEFAULT '', metadata "
                     "jsonb NOT NULL DEFAULT '{}'::jsonb, embedding vector(384), updated_at timestamptz)")
        t = time.perf_counter()
        with conn.transaction(), conn.cursor().copy("COPY bench_copy_raw (id, document, metadata, embedding) "
                                                    "FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        secs = time.perf_counter() - t
        conn.execute("DROP TABLE bench_copy_raw")
    return {"seconds": secs, "rows": len(rows)}


def _tool(client, url: str, name: str, arguments: dict) -> dict:
    answer = client.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                    "params": {"name": name, "arguments": arguments}}).json()
    return orjson.loads(answer["result"]["content"][0]["text"])


def hub_searches(url: str, docs: str, n: int = 0, stop_file: str = "") -> dict:
    """``mempalace_search`` through a live hub, one after another: ``n`` of them, or until
    ``stop_file`` appears. Latencies in ms."""
    import httpx

    queries = [d[:200] for d in _docs(docs)[:500]]
    lat = []
    t = time.perf_counter()
    with httpx.Client(timeout=300) as client:
        while (len(lat) < n) if n else not Path(stop_file).exists():
            q = time.perf_counter()
            _tool(client, url, "mempalace_search", {"query": queries[len(lat) % len(queries)], "limit": 5})
            lat.append((time.perf_counter() - q) * 1000)
    lat.sort()
    return {"seconds": time.perf_counter() - t, "rows": len(lat), "p50_ms": lat[len(lat) // 2],
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def routed_import(palace: str, source: str) -> dict:
    """``palace-etl import jsonl`` beside the hub holding ``palace``: the route it picks (the hub's)."""
    from etl.embed import MINILM, MiniLMEmbedder
    from etl.load import run_import
    from importers.base import ImportOptions
    from importers.registry import get_importer
    from palace.stores import open_writer

    t = time.perf_counter()
    r = run_import(get_importer("jsonl"), Path(source), open_writer(palace), ImportOptions(), MiniLMEmbedder, MINILM,
                   progress=False)
    return {"seconds": time.perf_counter() - t, "rows": r.drawers_written, "route": r.route}


def add_drawer_loop(url: str, source: str) -> dict:
    """MemPalace's own way to file memories one by one: a ``mempalace_add_drawer`` call each."""
    import httpx

    rows = [orjson.loads(line) for line in Path(source).read_bytes().splitlines()]
    t = time.perf_counter()
    with httpx.Client(timeout=300) as client:
        for r in rows:
            assert _tool(client, url, "mempalace_add_drawer", {"wing": "loop", "room": r["room"],
                                                             "content": r["text"]})["success"]
    return {"seconds": time.perf_counter() - t, "rows": len(rows)}


if __name__ == "__main__":
    limit = int(os.environ.get("BENCH_FSIZE_LIMIT", 8 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    name, args = sys.argv[1], json.loads(sys.argv[2])
    result = globals()[name](**args)
    result["peak_rss_mb"] = round(_rss_mb(), 1)
    print(json.dumps(result))

"""Worker processes for the concurrency tests: ``python -m tests.workers COMMAND ARGS``.

Each prints one JSON line with what it did, so the test can add things up.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def unit_vectors(seed: int, n: int, dim: int = 384) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def drawers(location: str, tag: str, n: int, batch: int, seed: int, kg: str | None = None) -> dict:
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    store = VectorStore(layout_for(location, kg), lock_timeout=120)
    vecs = unit_vectors(seed, n)
    errors = 0
    for s in range(0, n, batch):
        ids = [f"drawer_stress_{tag}_{i:06d}" for i in range(s, min(n, s + batch))]
        try:
            store.upsert(ids, [f"{tag} memory {i}" for i in range(s, s + len(ids))],
                         [{"wing": "stress", "room": tag, "chunk_index": i} for i in range(s, s + len(ids))],
                         vecs[s:s + len(ids)])
        except Exception as exc:  # counted, the test asserts there are none
            errors += 1
            print(f"upsert error: {exc!r}", file=sys.stderr)
    creations = store.client_creations
    store.close()
    return {"written": n, "errors": errors, "client_creations": creations}


def kg(path: str, tag: str, n: int) -> dict:
    from palace.kg import KnowledgeGraph

    errors = 0
    with KnowledgeGraph(path) as g:
        for i in range(n):
            try:
                g.write_batch([(f"{tag}_{i}", f"{tag} {i}", "stress", "{}")],
                              [(f"t_{tag}_{i}", f"{tag} {i}", "wrote", "stress test", None, None, 1.0, None, None,
                                "stress")])
            except Exception as exc:
                errors += 1
                print(f"kg error: {exc!r}", file=sys.stderr)
    return {"written": n, "errors": errors}


def self_query(location: str, spec: str, kg: str | None = None) -> dict:
    """Query every written drawer with the vector its writer generated; count the ones not ranked first.

    ``spec`` lists the writers as ``tag:seed:n,...`` (ids and vectors are derived from them), so the
    check never trusts vectors read back from a possibly damaged index.
    """
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    store = VectorStore(layout_for(location, kg), lock_timeout=120)
    col = store.reading()
    total = col.count()
    misses, errors, expected = 0, 0, 0
    for part in spec.split(","):
        tag, seed, n = part.split(":")
        ids = [f"drawer_stress_{tag}_{i:06d}" for i in range(int(n))]
        vecs = unit_vectors(int(seed), int(n))
        expected += len(ids)
        for s in range(0, len(ids), 500):
            try:
                res = col.query(query_embeddings=vecs[s:s + 500], n_results=1, include=[])
                misses += sum(1 for want, top in zip(ids[s:s + 500], res["ids"]) if not top or top[0] != want)
            except Exception as exc:
                errors += 1
                misses += len(ids[s:s + 500])
                print(f"query error: {exc!r}", file=sys.stderr)
    store.close()
    return {"total": total, "expected": expected, "misses": misses, "errors": errors}


def reader(location: str, seconds: float, interval: float) -> dict:
    """Read repeatedly for ``seconds``; report how often the client was re-created."""
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    store = VectorStore(layout_for(location), lock_timeout=120, refresh_interval=interval)
    reads, seen = 0, set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        col = store.reading()
        seen.add(col.count())
        col.query(query_embeddings=unit_vectors(reads, 1), n_results=1, include=[])
        reads += 1
        time.sleep(0.05)
    creations = store.client_creations
    store.close()
    return {"reads": reads, "client_creations": creations, "distinct_counts": len(seen)}


def own_writes(location: str, rounds: int) -> dict:
    """Alternate writes and reads in one process: own writes must never look external."""
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    store = VectorStore(layout_for(location), refresh_interval=0)  # check on every read
    for r in range(rounds):
        store.upsert([f"own_{r}"], [f"own {r}"], [{"wing": "w", "room": "r"}], unit_vectors(r, 1))
        store.reading().count()
    creations = store.client_creations
    store.close()
    return {"client_creations": creations}


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    fn = {"drawers": drawers, "kg": kg, "self_query": self_query, "reader": reader, "own_writes": own_writes}[cmd]
    conv = [int(a) if a.isdigit() else (float(a) if a.replace(".", "", 1).isdigit() else a) for a in args]
    print(json.dumps(fn(*conv)))

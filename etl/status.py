"""``palace-etl status``: what a palace holds, read without disturbing live writers."""
from __future__ import annotations

from palace import chroma_sqlite
from palace.kg import KnowledgeGraph
from palace.layout import PalaceLayout, read_sidecar
from palace.vectors import VectorStore

from .runs import Ledger


def palace_status(layout: PalaceLayout, probes: int = 0, lock_timeout: float = 5.0) -> dict:
    """Counts per wing/room, KG counts, runs; with ``probes`` > 0 also the self-query hit rate."""
    if layout.is_server:
        store = VectorStore(layout, lock_timeout=lock_timeout)
        try:
            wings: dict[str, dict[str, int]] = {}
            total = 0
            for _, _, _, m in store.scan(("metadatas",)):
                m = m or {}
                rooms = wings.setdefault(str(m.get("wing", "(none)")), {})
                room = str(m.get("room", "(none)"))
                rooms[room] = rooms.get(room, 0) + 1
                total += 1
            creations = store.client_creations
        finally:
            store.close()
    else:
        with chroma_sqlite.open_ro(chroma_sqlite.palace_db(layout.path)) as conn:
            total = chroma_sqlite.count(conn)
            wings = chroma_sqlite.wing_room_counts(conn)
        creations = 0
    ident = read_sidecar(layout.sidecar_dir)
    embedder = str(ident) if ident else None
    kg: dict = {"path": str(layout.kg_path)}
    if layout.kg_path.exists():
        with KnowledgeGraph(layout.kg_path) as g:
            kg.update(g.counts())
    runs = []
    if (layout.state_dir / "ledger.sqlite3").exists():
        ledger = Ledger(layout.state_dir)
        runs = ledger.runs()
        ledger.close()
    out = {"palace": layout.location, "drawers": total, "wings": wings, "embedder": embedder, "kg": kg,
           "runs": runs, "client_creations": creations}
    if probes:
        out.update(_probe(layout, probes, lock_timeout))
    return out


def _probe(layout: PalaceLayout, probes: int, lock_timeout: float) -> dict:
    from .verify import (
        _local_facts,
        _server_facts,
        probe_embedder,
        sample_ids,
        self_query,
    )

    store = VectorStore(layout, lock_timeout=lock_timeout)
    try:
        facts = _server_facts(store) if layout.is_server else _local_facts(layout)
        n, hits = self_query(store, sample_ids(facts.ids if facts else [], (0, 1, 1.0), probes),
                             probe_embedder(read_sidecar(layout.sidecar_dir)))
        return {"probes": n, "self_hit_rate": (hits / n) if n else None,
                "client_creations": store.client_creations}
    finally:
        store.close()

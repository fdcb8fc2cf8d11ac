"""``palace-etl status``: what a palace holds, read without disturbing live writers."""
from __future__ import annotations

from palace.errors import SourceMissing
from palace.stores import PalaceStore

from .runs import Ledger


def wing_room_counts(store: PalaceStore) -> dict[str, dict[str, int]]:
    wings: dict[str, dict[str, int]] = {}
    for page in store.rows("drawers", ("wing", "room")):
        for _, _, m in page:
            rooms = wings.setdefault(str(m.get("wing") or "(none)"), {})
            room = str(m.get("room") or "(none)")
            rooms[room] = rooms.get(room, 0) + 1
    return wings


def palace_status(store: PalaceStore, probes: int = 0) -> dict:
    """Counts per wing/room, KG counts, runs; with ``probes`` > 0 also the self-query hit rate."""
    if not store.exists() and store.kg_path is not None and not store.kg_path.exists():
        raise SourceMissing(f"status {store.name}: no palace there", hint="is this a palace directory?")
    counts = store.counts()
    ident = store.identity()
    kg: dict = {"path": str(store.kg_path) if store.kg_path else None}
    if store.kg_path is not None and store.kg_path.exists():
        with store.knowledge_graph(read_only=True) as g:
            kg.update(g.counts())
    with Ledger.reading(store.state_dir) as ledger:
        runs = ledger.runs() if ledger else []
    out = {"palace": store.name, "drawers": counts["drawers"], "wings": wing_room_counts(store),
           "embedder": str(ident) if ident else None, "kg": kg, "runs": runs}
    if probes:
        from .verify import probe_embedder, sample_ids, self_query

        ids = [i for page in store.rows("drawers", ()) for i, _, _ in page]
        found = self_query(store, sample_ids(ids, (0, 1, 1.0), probes), probe_embedder(ident))
        out.update(probes=found.probes, self_hit_rate=(found.hits / found.probes) if found.probes else None,
                   unreached=len(found.unreached), misplaced=len(found.misplaced))
    return out

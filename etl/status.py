"""``palace-etl status``: what a palace holds, read without disturbing live writers."""
from __future__ import annotations

from palace import chroma_sqlite
from palace.kg import KnowledgeGraph
from palace.layout import PalaceLayout, read_sidecar
from palace.vectors import VectorStore

from .runs import Ledger


def palace_status(layout: PalaceLayout) -> dict:
    if layout.is_server:
        store = VectorStore(layout)
        try:
            col = store.reading()
            wings: dict[str, dict[str, int]] = {}
            total = col.count()
            for offset in range(0, total, 5000):
                for m in col.get(include=["metadatas"], limit=5000, offset=offset)["metadatas"]:
                    m = m or {}
                    room = wings.setdefault(str(m.get("wing", "(none)")), {})
                    room[str(m.get("room", "(none)"))] = room.get(str(m.get("room", "(none)")), 0) + 1
            embedder, creations = None, store.client_creations
        finally:
            store.close()
    else:
        with chroma_sqlite.open_ro(chroma_sqlite.palace_db(layout.path)) as conn:
            total = chroma_sqlite.count(conn)
            wings = chroma_sqlite.wing_room_counts(conn)
        ident = read_sidecar(layout.path)
        embedder, creations = (str(ident) if ident else None), 0
    kg: dict = {"path": str(layout.kg_path)}
    if layout.kg_path.exists():
        with KnowledgeGraph(layout.kg_path) as g:
            kg.update(g.counts())
    runs = []
    if (layout.state_dir / "ledger.sqlite3").exists():
        ledger = Ledger(layout.state_dir)
        runs = ledger.runs()
        ledger.close()
    return {"palace": layout.location, "drawers": total, "wings": wings, "embedder": embedder, "kg": kg,
            "runs": runs, "client_creations": creations}

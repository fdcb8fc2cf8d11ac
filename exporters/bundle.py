"""``export`` to Parquet bundles: verified, incremental, restorable backups of a whole palace.

The format and its one writer are ``palace.bundles``; this module decides what goes in. The
snapshot (ids and row hashes, no vectors) is diffed against the newest bundle's ``state.parquet``;
only the rows that changed are fetched, with their vectors, a page per palace-lock hold, and
streamed into the bundle. A row another writer deleted between the snapshot and the fetch is
recorded as vanished: the bundle describes what it holds, and the next incremental records the
deletion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from palace.bundles import (
    BundleContent,
    bundle_dir_lock,
    bundle_state,
    chain,
    list_bundles,
    usable_parent,
    write_bundle,
)
from palace.errors import SourceMissing
from palace.manifest import BundleError
from palace.rows import COLLECTIONS, KG_TABLES, records_batch
from palace.stores import PalaceStore

EXPORT_PAGE = 1000  # rows fetched and written at a time: an export's memory stays flat (bench row 5)


@dataclass
class ExportReport:
    bundle: str | None
    kind: str
    previous: str | None
    counts: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    deleted: list = field(default_factory=list)
    dry_run: bool = False
    full_because: str | None = None  # why an --incremental run wrote a full bundle instead
    vanished: dict = field(default_factory=dict)  # table -> rows deleted by a writer during the export


def _parent(out: Path, incremental: bool, full_every: int) -> tuple[Path | None, str | None]:
    """The bundle an incremental chains onto (None: write a full one), and why not when it cannot."""
    bundles = list_bundles(out)
    if not incremental or not bundles:
        return None, None
    prev, why = usable_parent(bundles[-1])
    if prev is not None and len(chain(prev)) >= full_every:
        return None, None  # a full bundle every N incrementals
    return prev, why


def export_bundle(store: PalaceStore, out: Path, incremental: bool = False, full_every: int = 7,
                  dry_run: bool = False) -> ExportReport:
    if not store.exists():
        raise SourceMissing(f"export palace {store.name}: no palace there")
    out = Path(out)
    root = store.root
    if root is not None and out.resolve().is_relative_to(root):
        raise BundleError(f"export --out {out}: it is inside the palace {root}; a bundle there would be "
                          "taken for the palace's own files", hint="write bundles outside the palace")
    with bundle_dir_lock(out):
        prev, full_because = _parent(out, incremental, full_every)
        state = store.snapshot()
        old = bundle_state(prev) if prev else {}
        changed = {t: [i for i, h in rows.items() if old.get(t, {}).get(i) != h] for t, rows in state.items()}
        gone = [(t, i) for t in old for i in old[t] if i not in state.get(t, {})]
        report = ExportReport(None, "incremental" if prev else "full", prev.name if prev else None,
                              counts={t: len(v) for t, v in changed.items()},
                              totals={t: len(v) for t, v in state.items()}, deleted=gone, dry_run=dry_run,
                              full_because=full_because)
        if dry_run:
            return report
        vanished: dict[str, list[str]] = {t: [] for t in state}
        ident = store.identity()
        content = BundleContent(
            palace=store.name, state=state, tombstones=gone, sidecar=store.sidecar(),
            embedder={"model_name": ident.model_name, "dimension": ident.dimension} if ident else None)
        for table in COLLECTIONS:
            info = store.info(table)
            content.settings[table] = info.settings if info else {}
            if changed[table] and info and info.dimension:
                content.collections[table] = (info.dimension, _batches(store, table, changed[table], info.dimension,
                                                                       state[table], vanished[table]))
        for table in KG_TABLES:
            if changed[table]:
                rows = [r for page in store.fetch(table, changed[table]) for r in page]
                _drop_vanished(changed[table], {r["id"] for r in rows}, state[table], vanished[table])
                content.kg[table] = rows
        content.watermark = lambda: {"vanished": {t: len(v) for t, v in vanished.items() if v}}
        m = write_bundle(out, prev, content)
        report.counts = {t: m.counts.get(t, 0) for t in changed}
        report.totals = dict(m.totals)
        report.vanished = m.watermark["vanished"]
        report.bundle = str(out / m.name)
        return report


def _drop_vanished(wanted: list[str], found: set[str], state: dict[str, str], vanished: list[str]) -> None:
    for i in wanted:
        if i not in found:
            state.pop(i, None)
            vanished.append(i)


def _batches(store: PalaceStore, table: str, ids: list[str], dim: int, state: dict[str, str],
             vanished: list[str]) -> Iterator[pa.RecordBatch]:
    """The rows of ``ids`` with their vectors as record batches, a fetched page at a time. A row gone
    since the snapshot leaves ``state``, which the bundle writer writes after these batches."""
    found: set[str] = set()
    for s in range(0, len(ids), EXPORT_PAGE):
        for page in store.fetch(table, ids[s:s + EXPORT_PAGE]):
            found.update(r["id"] for r in page)
            yield records_batch(page, dim)
    _drop_vanished(ids, found, state, vanished)

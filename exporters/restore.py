"""``palace-etl restore``: rebuild a palace from a full bundle and its incremental chain.

Every file of every bundle in the chain is checked against its manifest sha256 first; a corrupt
or missing file is named and nothing is written. Vectors are carried, never re-embedded. The
target store builds the new palace aside and swaps it in (``replacing``), so a crash never leaves
a half palace at the target, and the result is checked against the newest manifest's totals
before it takes the target's place.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow.parquet as pq

from palace.bundles import chain, readable, tombstones, verify_chain
from palace.crypt import Keys
from palace.errors import PalaceEtlError
from palace.manifest import SIDECAR_FILE, BundleError, Manifest, read_parquet
from palace.rows import COLLECTIONS, KG_TABLES, rows_of_batch
from palace.stores import PalaceStore

BATCH = 5000  # rows read from a bundle file at a time (the store chunks its writes by its own limit)


@dataclass
class RestoreReport:
    palace: str
    chain: list[str]
    rows: dict = field(default_factory=dict)
    deleted: int = 0
    replaced: str | None = None
    dry_run: bool = False
    recovered: str | None = None  # a killed restore's complete build that this run put in place


def restore_bundle(bundle: Path, store: PalaceStore, force: bool = False, dry_run: bool = False,
                   lock_timeout: float = 30.0, keys: Keys | None = None) -> RestoreReport:
    problems = verify_chain(Path(bundle))
    if problems:
        raise BundleError("restore: the bundle is damaged, nothing written:\n  " + "\n  ".join(problems),
                          hint="restore an older bundle, or re-run the export")
    with readable(Path(bundle), keys) as plain:  # an encrypted chain: decrypted and checked before a write
        return _restore(plain, store, force, dry_run, lock_timeout)


def _restore(bundle: Path, store: PalaceStore, force: bool, dry_run: bool, lock_timeout: float) -> RestoreReport:
    links = chain(bundle)
    report = RestoreReport(store.name, [p.name for p in links], dry_run=dry_run)
    if not store.is_empty() and not force:
        raise PalaceEtlError(f"restore into {store.name}: it already holds a palace",
                             hint="restore into a new directory, or pass --force to replace it (kept aside)")
    if dry_run:
        store.check_target()  # what the real run would refuse, the dry run refuses too
        for link in links:
            for table, n in Manifest.load(link).counts.items():
                report.rows[table] = report.rows.get(table, 0) + n
        return report
    last = Manifest.load(links[-1])
    settings = {t: last.collections.get(t) or None for t in COLLECTIONS}
    with store.replacing(force, lock_timeout, lambda new: _check_totals(links[-1], new), settings) as swap:
        _build(links, swap.target, report)
    report.recovered, report.replaced = swap.recovered, swap.replaced
    _set_aside_last_sync(store)
    return report


def _set_aside_last_sync(store: PalaceStore) -> None:
    """A store whose sync state outlives a restore (a pgvector palace: new tables, the same directory)
    no longer holds what it held at its last sync; rows the bundle lacks would look deleted there,
    and the next sync would delete them from its replicas. Tombstones, history and forgotten ids stay."""
    saved = store.sync_state()
    if saved.known is not None:
        store.save_sync_state(replace(saved, known=None, marks=None))


def _check_totals(last: Path, store: PalaceStore) -> None:
    """The restored palace holds exactly the rows the newest bundle's manifest says the palace held."""
    totals = Manifest.load(last).totals
    got = store.counts()
    wrong = [f"{t}: {got.get(t, 0)} restored, the manifest says {n}" for t, n in sorted(totals.items())
             if got.get(t, 0) != n]
    if wrong:
        raise BundleError(f"restore from {last}: the result does not match the bundle ({'; '.join(wrong)}); "
                          "the target was not touched", hint="the chain is inconsistent: restore another bundle")


def _build(links: list[Path], store: PalaceStore, report: RestoreReport) -> None:
    """Apply the chain in order into ``store``: each bundle's rows, then its tombstones; the newest sidecar."""
    for link in links:
        for table in COLLECTIONS:
            path = link / f"{table}.parquet"
            if path.exists():
                for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH):
                    store.write(table, rows_of_batch(batch))
                    report.rows[table] = report.rows.get(table, 0) + batch.num_rows
        for table in KG_TABLES:
            path = link / f"{table}.parquet"
            if path.exists():
                rows = read_parquet(path).to_pylist()
                store.write(table, rows)
                report.rows[table] = report.rows.get(table, 0) + len(rows)
        for table, ids in tombstones(link).items():
            if table in (*COLLECTIONS, *KG_TABLES):
                report.deleted += len(ids)
                store.delete(table, ids)
    sidecar = links[-1] / SIDECAR_FILE
    if sidecar.is_file():
        store.put_sidecar(sidecar.read_bytes())
    store.commit()

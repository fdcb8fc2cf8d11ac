"""``palace-etl restore``: rebuild a palace from a full bundle and its incremental chain.

Every file of every bundle in the chain is checked against its manifest sha256
first; a corrupt or missing file is named and nothing is written. Vectors are
carried, never re-embedded. The palace is built in a sibling temp directory and
renamed into place, so a crash never leaves a half palace at the target.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from etl.errors import PalaceEtlError
from palace.kg import KnowledgeGraph
from palace.layout import CHROMA_DB, SIDECAR, PalaceLayout, layout_for
from palace.vectors import VectorStore

from .bundle import COLLECTIONS, KG_TABLES, chain
from .manifest import BundleError, Manifest, check_files


@dataclass
class RestoreReport:
    palace: str
    chain: list[str]
    rows: dict = field(default_factory=dict)
    deleted: int = 0
    replaced: str | None = None
    dry_run: bool = False


def verify_bundle(bundle: Path) -> list[str]:
    """Problems with a bundle and its chain: files vs manifest sha256, row counts vs manifest."""
    problems = []
    for link in chain(Path(bundle)):
        m = Manifest.load(link)
        file_problems = check_files(link, m)
        problems += file_problems
        if file_problems:
            continue
        for table, n in m.counts.items():
            if table == "tombstones":
                got = pq.ParquetFile(link / "tombstones.parquet").metadata.num_rows
            elif n:
                got = pq.ParquetFile(link / f"{table}.parquet").metadata.num_rows if (link / f"{table}.parquet").exists() else 0
            else:
                continue
            if got != n:
                problems.append(f"{link / (table + '.parquet')}: {got} rows, manifest says {n}")
    return problems


def _target_is_empty(layout: PalaceLayout) -> bool:
    if layout.kg_path.exists():
        return False
    if not layout.is_server:
        return not (layout.path / CHROMA_DB).exists()
    from .bundle import _server_snapshot

    return not any(_server_snapshot(layout).values())


def restore_bundle(bundle: Path, layout: PalaceLayout, force: bool = False, dry_run: bool = False,
                   lock_timeout: float = 30.0) -> RestoreReport:
    links = chain(Path(bundle))
    problems = verify_bundle(Path(bundle))
    if problems:
        raise BundleError("restore: the bundle is damaged, nothing written:\n  " + "\n  ".join(problems),
                          hint="restore an older bundle, or re-run the export")
    report = RestoreReport(layout.location, [p.name for p in links], dry_run=dry_run)
    if not _target_is_empty(layout) and not force:
        raise PalaceEtlError(f"restore into {layout.location}: it already holds a palace",
                             hint="restore into a new directory, or pass --force to replace it (kept aside)")
    if dry_run:
        for link in links:
            for table, n in Manifest.load(link).counts.items():
                report.rows[table] = report.rows.get(table, 0) + n
        return report
    if layout.is_server:  # a server's data cannot be built aside and renamed: it must be empty
        if force:
            raise PalaceEtlError(f"restore into {layout.location}: --force cannot replace a server's palace",
                                 hint="start an empty chroma server (and an empty --kg) and restore into it")
        _build(links, layout, report, lock_timeout)
        return report
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = layout.path.with_name(f".{layout.path.name}.restoring-{stamp}")
    kg_inside = layout.kg_path.is_relative_to(layout.path)
    work_kg = work / layout.kg_path.relative_to(layout.path) if kg_inside else work.with_name(work.name + ".kg")
    try:
        _build(links, layout_for(work, work_kg), report, lock_timeout)
        if not _target_is_empty(layout):
            aside = layout.path.with_name(f"{layout.path.name}.before-restore-{stamp}")
            os.rename(layout.path, aside)
            report.replaced = str(aside)
            if not kg_inside and layout.kg_path.exists():
                os.rename(layout.kg_path, aside / layout.kg_path.name)
        if layout.path.exists():
            layout.path.rmdir()  # an empty directory given as the target
        os.rename(work, layout.path)
        if not kg_inside:
            layout.kg_path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(work_kg, layout.kg_path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if not kg_inside and work_kg.exists():
            work_kg.unlink()
        raise
    return report


def _build(links: list[Path], layout: PalaceLayout, report: RestoreReport, lock_timeout: float) -> None:
    last = Manifest.load(links[-1])
    stores = {t: VectorStore(layout, lock_timeout=lock_timeout, collection=name,
                             metadata=last.collections.get(t) or None) for t, name in COLLECTIONS.items()}
    kg = KnowledgeGraph(layout.kg_path)
    try:
        for link in links:
            for table, store in stores.items():
                path = link / f"{table}.parquet"
                if not path.exists():
                    continue
                for batch in pq.ParquetFile(path).iter_batches(batch_size=5000):  # near Chroma's max batch
                    vecs = batch.column("embedding").values.to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
                    store.upsert(batch.column("id").to_pylist(), batch.column("document").to_pylist(),
                                 [orjson.loads(m) or None for m in batch.column("metadata").to_pylist()], vecs)
                    report.rows[table] = report.rows.get(table, 0) + batch.num_rows
            for table in KG_TABLES:
                path = link / f"{table}.parquet"
                if path.exists():
                    n = kg.replace_rows(table, pq.read_table(path).to_pylist())
                    report.rows[table] = report.rows.get(table, 0) + n
            gone: dict[str, list[str]] = {}
            for t in pq.read_table(link / "tombstones.parquet").to_pylist():
                gone.setdefault(t["table"], []).append(t["id"])
            for table, ids in gone.items():
                report.deleted += len(ids)
                if table in stores:
                    for s in range(0, len(ids), 5000):
                        stores[table].delete(ids[s:s + 5000])
                elif table in KG_TABLES:
                    kg.delete_rows(table, ids)
        sidecar = links[-1] / "sidecars" / SIDECAR
        if sidecar.exists():
            layout.sidecar_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(sidecar, layout.sidecar_dir / SIDECAR)
    finally:
        for s in stores.values():
            s.close()
        kg.close()

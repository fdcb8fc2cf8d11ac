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
import signal
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from palace import chroma_sqlite
from palace.errors import PalaceEtlError
from palace.kg import KnowledgeGraph
from palace.layout import CHROMA_DB, SIDECAR, PalaceLayout, layout_for
from palace.lock import palace_lock, session_lock
from palace.vectors import VectorStore

from .bundle import COLLECTIONS, KG_TABLES, chain, verify_chain
from .manifest import BundleError, Manifest

COMPLETE = ".palace-etl-restore-complete"  # inside a build that finished and was checked
CRASH_ENV = "PALACE_ETL_TEST_CRASH_AT"  # test-only: kill this process at a named point


@dataclass
class RestoreReport:
    palace: str
    chain: list[str]
    rows: dict = field(default_factory=dict)
    deleted: int = 0
    replaced: str | None = None
    dry_run: bool = False
    recovered: str | None = None  # a killed restore's complete build that this run put in place


def verify_bundle(bundle: Path) -> list[str]:
    """Problems with a bundle and its chain: manifests, files vs sha256, row counts vs manifest."""
    return verify_chain(Path(bundle))


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
        if not layout.is_server:
            _check_target(layout)  # what the real run would refuse, the dry run refuses too
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
    with session_lock(layout.path, exclusive=True, timeout=lock_timeout), \
            palace_lock(layout.path, timeout=lock_timeout):
        report.recovered = _recover_killed_restores(layout)
        _check_target(layout)
        if not _target_is_empty(layout) and not force:  # a recovered swap put a palace back
            raise PalaceEtlError(f"restore into {layout.location}: it already holds a palace",
                                 hint="pass --force to replace it (kept aside)")
        _restore_local(links, layout, report, lock_timeout)
    return report


def _check_target(layout: PalaceLayout) -> None:
    """Refuse, before building anything, a target that is a file or a directory holding something
    other than a palace (restore replaces palaces, nothing else)."""
    path = layout.path
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise PalaceEtlError(f"restore into {path}: it is not a directory; nothing written")
    ours = {CHROMA_DB, layout.kg_path.name, layout.state_dir.name, SIDECAR}
    if path.is_dir() and any(path.iterdir()) and not ours & {p.name for p in path.iterdir()}:
        raise PalaceEtlError(f"restore into {path}: the directory holds files but no palace; nothing written",
                             hint="restore into a new or empty directory")


def _work_dirs(layout: PalaceLayout) -> list[Path]:
    parent, prefix = layout.path.parent, f".{layout.path.name}.restoring-"
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()) \
        if parent.is_dir() else []


def _recover_killed_restores(layout: PalaceLayout) -> str | None:
    """Leftovers of killed restores (the caller holds the palace's locks, so none is running): a
    complete build whose swap was cut off between its two renames is put in place; partial builds
    are removed. Returns the recovered build's name, if any."""
    recovered = None
    for work in _work_dirs(layout):
        if recovered is None and not layout.path.exists() and (work / COMPLETE).exists():
            (work / COMPLETE).unlink()
            os.rename(work, layout.path)
            recovered = work.name
        else:
            shutil.rmtree(work, ignore_errors=True)
    return recovered


def _restore_local(links: list[Path], layout: PalaceLayout, report: RestoreReport, lock_timeout: float) -> None:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    work = layout.path.with_name(f".{layout.path.name}.restoring-{stamp}")
    kg_inside = layout.kg_path.is_relative_to(layout.path)
    work_kg = work / layout.kg_path.relative_to(layout.path) if kg_inside else work.with_name(work.name + ".kg")
    try:
        _build(links, layout_for(work, work_kg), report, lock_timeout)
        _check_totals(links[-1], work, work_kg)
        _private(work)
        (work / COMPLETE).touch(mode=0o600)
        if not _target_is_empty(layout):
            aside = layout.path.with_name(f"{layout.path.name}.before-restore-{stamp}")
            os.rename(layout.path, aside)
            report.replaced = str(aside)
            if not kg_inside and layout.kg_path.exists():
                os.rename(layout.kg_path, aside / layout.kg_path.name)
        if os.environ.get(CRASH_ENV) == "restore-swap":  # test-only: a kill between the two renames
            os.kill(os.getpid(), signal.SIGKILL)
        if layout.path.exists():
            layout.path.rmdir()  # an empty directory given as the target
        os.rename(work, layout.path)
        (layout.path / COMPLETE).unlink()
        if not kg_inside:
            layout.kg_path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(work_kg, layout.kg_path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if not kg_inside and work_kg.exists():
            work_kg.unlink()
        raise


def _private(root: Path) -> None:
    """The bundle's modes on the restored palace: directories 0700, files 0600."""
    os.chmod(root, 0o700)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, 0o700 if p.is_dir() else 0o600)


def _check_totals(last: Path, palace: Path, kg_path: Path) -> None:
    """The restored palace holds exactly the rows the newest bundle's manifest says the palace held."""
    totals = Manifest.load(last).totals
    got: dict[str, int] = {}
    with chroma_sqlite.open_ro(palace / CHROMA_DB) as conn:
        for table, name in COLLECTIONS.items():
            got[table] = chroma_sqlite.count(conn, name)
    if kg_path.exists():
        with KnowledgeGraph(kg_path) as kg:
            for table in KG_TABLES:
                got[table] = kg.query(f"SELECT count(*) FROM {table}")[0][0]
    wrong = [f"{t}: {got.get(t, 0)} restored, the manifest says {n}" for t, n in sorted(totals.items())
             if got.get(t, 0) != n]
    if wrong:
        raise BundleError(f"restore from {last}: the result does not match the bundle ({'; '.join(wrong)}); "
                          "the target was not touched", hint="the chain is inconsistent: restore another bundle")


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

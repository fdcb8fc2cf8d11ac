"""The loader: canonical Arrow batches -> a MemPalace palace, idempotently.

Per importer batch, in order:
- drawers: drop ids already seen in this run; read which ids the palace already
  holds with the same content and metadata (skipped: a re-run writes nothing);
  take carried vectors when their embedder identity matches the palace's, embed
  the rest; upsert in chunks of the client's ``max_batch_size`` under the palace
  lock, through the palace store (which refreshes its stamp of ``chroma.sqlite3``
  after each own write, so own writes never look external).
- entities and triples: one ``BEGIN IMMEDIATE`` transaction per batch.
- then the ledger records the batch as committed, so a re-run after a crash
  resumes after it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import orjson
import pyarrow as pa
from tqdm import tqdm

from importers.base import Importer, ImportOptions, check_source
from importers.quarantine import Quarantine
from importers.schema import (
    DRAWERS,
    ENTITIES,
    TRIPLES,
    embedding_identity,
    validate_batch,
)
from palace.clock import record_zone
from palace.errors import PalaceEtlError, SourceFormatError
from palace.kg import KnowledgeGraph
from palace.rows import id_key
from palace.stores import PalaceStore

from .embed import Embedder, EmbedderIdentity
from .ids import ID_RECIPE
from .runs import Ledger, make_run_id, source_fingerprint

NORMALIZE_VERSION = 2  # mempalace.palace.NORMALIZE_VERSION
# metadata keys whose change alone does not make a drawer "changed"
_VOLATILE = ("filed_at", "last_modified")


@dataclass
class ImportReport:
    run_id: str | None
    importer: str
    source: str
    palace: str
    dry_run: bool
    embedder: str
    drawers_read: int = 0
    drawers_written: int = 0
    drawers_unchanged: int = 0
    drawers_duplicate: int = 0
    vectors_embedded: int = 0
    vectors_carried: int = 0
    vector_decision: str = "embed"
    route: str = "direct"  # direct (our ids, metadata, vectors) or hub (through a live MemPalace hub)
    route_drops: list[str] = field(default_factory=list)  # what the route could not carry
    route_notes: list[str] = field(default_factory=list)  # what the route found wrong and put right
    drawers_refused: int = 0  # drawers the hub would not file (quarantined with its reason)
    entities_read: int = 0
    triples_read: int = 0
    kg_rows_written: int = 0
    batches_resumed: int = 0
    rows_resumed: int = 0
    resume_refused: str | None = None  # why an earlier attempt's committed batches were written again
    quarantined: int = 0
    quarantine_file: str | None = None
    quarantine_first: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    per_room: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DrawerJob:
    """The drawers of one batch that need writing: their rows in ``batch`` (``todo``), what is
    written, and the vectors once carried or embedded."""

    batch: pa.RecordBatch
    todo: list[int]
    ids: list[str]
    documents: list[str]
    metadatas: list[dict]
    vectors: np.ndarray | None = None

    def rows(self) -> list[dict]:
        return [{"id": i, "document": d, "metadata": m, "embedding": v}
                for i, d, m, v in zip(self.ids, self.documents, self.metadatas, self.vectors)]


@dataclass
class KgJob:
    """Entity rows ``(id, name, type, properties)`` and triple rows for ``KnowledgeGraph.write_batch``."""

    entities: list[tuple] = field(default_factory=list)
    triples: list[tuple] = field(default_factory=list)


def now_filed_at() -> str:
    """MemPalace's ``filed_at``: ``datetime.now().isoformat()``, local time, no zone, microseconds."""
    return dt.datetime.now().isoformat(timespec="microseconds")


def drawer_metadata(row: dict, filed_at: str) -> dict:
    """Flat scalar Chroma metadata for one canonical drawer row (no empty values, no dicts)."""
    meta = {
        "wing": row["wing"], "room": row["room"], "source_file": row["source_file"],
        "chunk_index": int(row["chunk_index"]), "added_by": row["added_by"],
        "filed_at": row["filed_at"] or filed_at, "last_modified": filed_at,
        "id_recipe": ID_RECIPE, "normalize_version": NORMALIZE_VERSION,
        "origin_system": row["origin_system"], "origin_id": row["origin_id"],
        "content_sha256": row["content_sha256"],
    }
    if row.get("hall"):
        meta["hall"] = row["hall"]
    for key in ("created_at", "updated_at"):
        if row.get(key) is not None:
            meta[key] = row[key].isoformat()
    if row.get("extra"):
        for k, v in orjson.loads(row["extra"]).items():
            if k not in meta and isinstance(v, (str, int, float, bool)) and v != "":
                meta[k] = v
    return meta


def _same_value(a, b) -> bool:
    """Equal metadata values. Chroma 1.5.9 stores a float with about 16 significant digits, so ~10% of
    17-digit floats (mtimes, scores) come back one digit shorter: that is the same value, not an edit."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-15, abs_tol=1e-300)
    return a == b and type(a) is type(b)


def _same(existing: dict | None, new: dict) -> bool:
    if not existing:
        return False
    keys = (set(existing) | set(new)) - set(_VOLATILE)
    return all(_same_value(existing.get(k), new.get(k)) for k in keys)


class Loader:
    def __init__(self, store: PalaceStore, embedder_factory: Callable[[], Embedder],
                 embedder_identity: EmbedderIdentity, lock_timeout: float = 5.0, dry_run: bool = False,
                 progress: bool = True):
        if store.state_dir is None:
            raise PalaceEtlError(f"import into {store.name}: not a palace (a bundle directory cannot be "
                                 "imported into)", hint="import into a palace directory, then export or sync it")
        self.store = store
        self._embedder_factory = embedder_factory
        self._embedder: Embedder | None = None
        self.identity = embedder_identity
        self.lock_timeout = lock_timeout
        self.dry_run = dry_run
        self.progress = progress
        self.palace_exists = False
        self.kg: KnowledgeGraph | None = None

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = self._embedder_factory()
        return self._embedder

    # ------------------------------------------------------------------ run
    def run(self, importer: Importer, source: Path, options: ImportOptions) -> ImportReport:
        source = Path(source)
        check_source(importer.name, source)
        started = time.monotonic()
        fingerprint = source_fingerprint(source)
        run_id = make_run_id(importer.name, source, fingerprint, options.to_dict())
        report = ImportReport(run_id, importer.name, str(source.resolve()), self.store.name, self.dry_run,
                              str(self.identity))
        report.route, report.route_drops = self.store.route, list(self.store.dropped)
        if report.route != "direct":
            report.vector_decision = f"the {report.route} embeds every text itself (this route cannot carry vectors)"
        palace_exists = self.store.exists()
        quarantine = Quarantine(None if self.dry_run else self.store.state_dir / "quarantine" / f"{run_id}.jsonl")
        # may refuse its options before anything is written
        stream = read_source(importer.name, source, importer.batches(source, options, quarantine))
        try:
            first = next(stream, None)  # nothing is created before the source shows one good record
        except BaseException:
            quarantine.discard()
            raise
        if first is None:
            if quarantine.count:
                quarantine.discard()
                raise SourceFormatError(source, None, f"not a {importer.name} source, nothing imported "
                                        f"({quarantine.count} unreadable record(s); first: {quarantine.first[0]})",
                                        hint=f"palace-etl import auto {source} says what it looks like")
            report.skipped = quarantine.skipped
            report.seconds = round(time.monotonic() - started, 3)
            return report  # empty input: not an error, and nothing to create
        quarantine.activate()
        self._quarantine = quarantine
        self._forgotten = {t: set(v) for t, v in self.store.sync_state().forgotten.items()} if palace_exists else {}
        stream = itertools.chain([first], stream)
        held = contextlib.nullcontext() if self.dry_run else \
            self.store.session(exclusive=False, timeout=self.lock_timeout)
        with held:  # a restore never swaps the palace mid-run
            return self._run(importer, source, options, stream, quarantine, report, run_id, fingerprint,
                             palace_exists, started)

    def _run(self, importer, source, options, stream, quarantine, report, run_id, fingerprint, palace_exists,
             started) -> ImportReport:
        ledger = None if self.dry_run else Ledger(self.store.state_dir)
        resume_after, started_run = -1, False
        try:
            if not self.dry_run or palace_exists:
                self._open(create=not self.dry_run)
            if ledger is not None:
                if quarantine.path and quarantine.path.exists() and quarantine.path not in quarantine.created:
                    quarantine.path.unlink()  # an earlier run's: this run re-parses the source from the start
                resume_after = ledger.start(run_id, importer.name, source.resolve(), fingerprint, options.to_dict())
                started_run = True
                if resume_after >= 0 and (why := self._lost(ledger, run_id)):
                    ledger.restart(run_id)
                    resume_after, report.resume_refused = -1, why
            seen: set[str] = set()
            bar = tqdm(desc=f"import {importer.name}", unit=" drawers", disable=not self.progress, leave=False)
            self._pipeline(enumerate(stream), resume_after, seen, report,
                           ledger, run_id, bar)
            bar.close()
            report.route_notes = list(self.store.recovered)
            self._refused(source, quarantine, report)
            report.quarantined = quarantine.count
            report.quarantine_first = quarantine.first
            report.skipped = quarantine.skipped
            report.quarantine_file = str(quarantine.path) if quarantine.count and quarantine.path else None
            report.seconds = round(time.monotonic() - started, 3)
            if ledger is not None:
                ledger.finish(run_id, "complete", report.to_dict())
            return report
        except BaseException:
            if started_run:  # a run that never reached the ledger (locked, refused) leaves it as it was
                ledger.finish(run_id, "interrupted", report.to_dict())
            raise
        finally:
            quarantine.close()
            if ledger is not None:
                ledger.close()
            self.close()

    def _refused(self, source: Path, quarantine: Quarantine, report: ImportReport) -> None:
        """Drawers a hub would not file go to the quarantine with its reason (the run still commits)."""
        for drawer_id, reason in self.store.refused:
            quarantine.add(SourceFormatError(source, None, f"{self.store.name} ({report.route}) refused drawer {drawer_id}: {reason}"))
            report.drawers_refused += 1
            report.drawers_written -= 1

    def _open(self, create: bool) -> None:
        self.palace_exists = True
        if create:
            record_zone(self.store.state_dir)  # the zone of the naive filed_at stamps written here
            self.store.claim_identity(self.identity)
            self.kg = self.store.knowledge_graph()
        elif self.store.kg_path.exists():
            self.kg = self.store.knowledge_graph(read_only=True)

    def close(self) -> None:
        self.store.close()
        if self.kg is not None:
            self.kg.close()
            self.kg = None

    # -------------------------------------------------------------- batches
    def _resume_skip(self, batch: pa.RecordBatch, kind: str, seen: set[str], report: ImportReport) -> None:
        report.batches_resumed += 1
        report.rows_resumed += batch.num_rows
        if kind == DRAWERS:
            for row in batch.select(["id", "wing", "room"]).to_pylist():
                if row["id"] not in seen:
                    seen.add(row["id"])
                    report.drawers_read += 1
                    report.drawers_unchanged += 1
                    _count_room(report, row)
        elif kind == ENTITIES:
            report.entities_read += batch.num_rows
        else:
            report.triples_read += batch.num_rows

    def _pipeline(self, batches, resume_after: int, seen: set[str], report: ImportReport, ledger, run_id,
                  bar) -> None:
        """Plan and embed batch i+1 in this thread while a writer thread commits batch i.

        All palace writes (Chroma, KG, ledger) go through one writer thread, in order, with at
        most one batch in flight; a batch is recorded in the ledger only after it is written.
        """
        def plan_next():
            for seq, batch in batches:
                kind = validate_batch(batch)
                if seq <= resume_after:
                    self._resume_skip(batch, kind, seen, report)
                    continue
                return seq, kind, batch.num_rows, self._plan(batch, kind, seen, report), self._sample(batch, kind)
            return None

        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="palace-writer")
        pending = None
        try:
            cur = plan_next()
            while cur is not None:
                seq, kind, rows, job, sample = cur
                if kind == DRAWERS and job and not self.dry_run:
                    job.vectors = self._vectors(job, report) if report.route == "direct" else [None] * len(job.ids)
                nxt = plan_next()  # ids differ from cur's, so planning need not wait for its write
                if pending is not None:
                    pending.result()
                pending = writer.submit(self._commit, seq, kind, rows, job, report, ledger, run_id, sample)
                if kind == DRAWERS:
                    bar.update(rows)
                cur = nxt
            if pending is not None:
                pending.result()
        finally:
            writer.shutdown(wait=True)  # never close the palace under an in-flight write

    def _sample(self, batch: pa.RecordBatch, kind: str) -> list[str]:
        """A batch's first and last ids (not forgotten): what a resume checks is still there, once
        ``_commit`` has kept those the palace holds after writing it."""
        if not batch.num_rows:
            return []
        ids = batch.column("id")
        return self._unforgotten(kind, list(dict.fromkeys((ids[0].as_py(), ids[-1].as_py()))))

    def _unforgotten(self, kind: str, ids: list[str]) -> list[str]:
        gone = self._forgotten.get(kind, ())
        return [i for i in ids if not (gone and id_key(i) in gone)]

    def _held(self, kind: str, ids: list[str]) -> set[str]:
        """Which of ``ids`` (rows of ``kind``) the palace holds."""
        if not ids:
            return set()
        if kind == DRAWERS:
            return set(self._existing(ids))
        if self.kg is None:
            return set()
        return {i for s in range(0, len(ids), 500) for (i,) in self.kg.query(
            f"SELECT id FROM {kind} WHERE id IN ({','.join('?' * len(ids[s:s + 500]))})", ids[s:s + 500])}

    def _plan(self, batch: pa.RecordBatch, kind: str, seen: set[str], report: ImportReport):
        if kind == DRAWERS:
            return self._plan_drawers(batch, seen, report)
        if kind == ENTITIES:
            report.entities_read += batch.num_rows
            return KgJob(entities=[(r["id"], r["name"], r["type"], r["properties"])
                                   for r in self._remembered("entities", batch.to_pylist())])
        report.triples_read += batch.num_rows
        cols = ["id", "subject", "predicate", "object", "valid_from", "valid_to", "confidence", "source_file",
                "source_drawer_id", "adapter_name"]
        return KgJob(triples=[tuple(r[c] for c in cols) for r in self._remembered("triples", batch.to_pylist())])

    def _remembered(self, table: str, rows: list[dict]) -> list[dict]:
        """``rows`` without those ``palace-etl forget`` erased: a re-run of a migration never brings
        them back (counted under skipped)."""
        gone = self._forgotten.get(table)
        if not gone:
            return rows
        kept = [r for r in rows if id_key(r["id"]) not in gone]
        if len(kept) < len(rows):
            self._quarantine.skip(f"forgotten {table} (palace-etl forget)", len(rows) - len(kept))
        return kept

    def _lost(self, ledger, run_id: str) -> str | None:
        """Why the palace no longer holds what an earlier attempt of this run committed (put back from
        an older copy, or restored, since), or None: then the attempt may be resumed."""
        missing, checked = {}, 0
        for kind in (DRAWERS, ENTITIES, TRIPLES):
            sample = self._unforgotten(kind, ledger.held(run_id, kind))  # one forgotten since is not lost
            checked += len(sample)
            if lost := len(set(sample) - self._held(kind, sample)):
                missing[kind] = lost
        if not missing:
            return None
        # counts, not ids: the ledger keeps this report, and forget does not reach reports
        return (f"{sum(missing.values())} of {checked} rows an earlier attempt committed are not in the palace ("
                + ", ".join(f"{n} {kind}" for kind, n in missing.items())
                + "; its files were put back or restored since): the source is read again from the start")

    def _commit(self, seq: int, kind: str, rows: int, job: DrawerJob | KgJob | None, report: ImportReport, ledger,
                run_id, sample: list[str]) -> None:
        written = 0
        if not self.dry_run and job:
            if kind == DRAWERS:
                self.store.write("drawers", job.rows())
                written = len(job.ids)
            else:
                e, t = self.kg.write_batch(job.entities, job.triples)
                report.kg_rows_written += e + t
                written = e + t
                # a triple is not written when an open one says the same under another id
                held = self._held(kind, sample)
                sample = [i for i in sample if i in held]
        if ledger is not None:
            ledger.committed(run_id, seq, kind, rows, written, sample)

    def _plan_drawers(self, batch: pa.RecordBatch, seen: set[str], report: ImportReport) -> DrawerJob | None:
        """Which rows of a drawer batch need writing, with their metadata; None when none do."""
        rows = batch.to_pylist()
        fresh = []
        gone = self._forgotten.get("drawers", ())
        for i, row in enumerate(rows):
            if gone and id_key(row["id"]) in gone:
                self._quarantine.skip("forgotten drawers (palace-etl forget)")
                continue
            if row["id"] in seen:
                report.drawers_duplicate += 1
                continue
            seen.add(row["id"])
            fresh.append(i)
        report.drawers_read += len(fresh)
        if not fresh:
            return None
        filed_at = now_filed_at()
        existing = self._existing([rows[i]["id"] for i in fresh])
        todo, metas = [], []
        for i in fresh:
            row = rows[i]
            old = existing.get(row["id"])
            meta = drawer_metadata(row, old.get("filed_at") if old and old.get("filed_at") else filed_at)
            _count_room(report, row)
            if _same(old, meta):
                report.drawers_unchanged += 1
                continue
            todo.append(i)
            metas.append(meta)
        report.drawers_written += len(todo)
        if not todo:
            return None
        return DrawerJob(batch, todo, [rows[i]["id"] for i in todo], [rows[i]["document"] for i in todo], metas)

    def _existing(self, ids: list[str]) -> dict[str, dict]:
        if not self.palace_exists:
            return {}
        return {r["id"]: r["metadata"] for page in self.store.fetch("drawers", ids, vectors=False) for r in page}

    def _vectors(self, job: DrawerJob, report: ImportReport) -> np.ndarray:
        batch, todo = job.batch, job.todo
        carried = embedding_identity(batch.schema)
        if carried is not None:
            ident = EmbedderIdentity(*carried)
            if ident == self.identity:
                report.vector_decision = f"carry ({ident} matches the palace)"
                col = batch.column("embedding")
                flat = col.values.to_numpy(zero_copy_only=False).reshape(len(col), ident.dimension)
                report.vectors_carried += len(todo)
                return flat[todo].astype(np.float32)
            report.vector_decision = f"re-embed (source vectors are {ident}, palace uses {self.identity})"
        report.vectors_embedded += len(todo)
        return self.embedder.embed(job.documents)


def read_source(name: str, source: Path, stream):
    """The importer's batches; any failure while reading the source (unreadable file, truncated
    archive, a database that is not one, ...) becomes ``file: cause`` instead of a traceback, and an
    EOFError is never mistaken for Ctrl-C."""
    try:
        yield from stream
    except PalaceEtlError:
        raise
    except Exception as exc:
        where = getattr(exc, "filename", None) or source
        cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise SourceFormatError(where, None, f"cannot read this {name} source ({type(exc).__name__}: {cause})",
                                hint="check the file; --debug shows where it failed") from exc


def _count_room(report: ImportReport, row: dict) -> None:
    report.per_room.setdefault(row["wing"], {}).setdefault(row["room"], 0)
    report.per_room[row["wing"]][row["room"]] += 1


def run_import(importer: Importer, source: Path, store: PalaceStore, options: ImportOptions,
               embedder_factory: Callable[[], Embedder], embedder_identity: EmbedderIdentity,
               dry_run: bool = False, lock_timeout: float = 5.0, progress: bool = True) -> ImportReport:
    loader = Loader(store, embedder_factory, embedder_identity, lock_timeout=lock_timeout, dry_run=dry_run,
                    progress=progress)
    return loader.run(importer, source, options)

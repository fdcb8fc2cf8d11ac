"""``palace-etl verify``: prove a palace is healthy and holds what its source held.

Phases run cheapest first: structure (files, collection settings, embedder
identity) -> bookkeeping (SQLite quick_check, ledger, KG dangling ids) -> parity
with a source (ids, content hashes, wing/room, triples) -> retrieval probes
(each sampled drawer queried with its own vector must rank itself first).
Every finding has a severity, a code, a message and the command that fixes it.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from importers.base import ImportOptions
from importers.registry import get_importer
from palace import chroma_sqlite
from palace.kg import KnowledgeGraph
from palace.layout import PalaceLayout, read_sidecar
from palace.vectors import VectorStore

from .embed import EmbedderIdentity
from .errors import PalaceEtlError, SourceMissing
from .runs import Ledger, Quarantine
from .schema import DRAWERS, TRIPLES, batch_kind

REPORT_SCHEMA_VERSION = 1
SELF_HIT_THRESHOLD = 0.999
MAX_LISTED = 20


@dataclass
class Finding:
    severity: str  # "error" | "warning"
    code: str
    message: str
    remedy: str | None = None


@dataclass
class VerifyReport:
    palace: str
    findings: list[Finding] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    totals: dict = field(default_factory=lambda: {"drawers": 0, "probes": 0, "self_hits": 0,
                                                  "self_hit_rate": 1.0, "triples": 0})

    def add(self, severity: str, code: str, message: str, remedy: str | None = None) -> None:
        self.findings.append(Finding(severity, code, message, remedy))

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"schema_version": REPORT_SCHEMA_VERSION, **asdict(self), "ok": self.ok}


def parse_sample(spec: str | None) -> tuple[int, int, float]:
    """``'5%'`` -> keep 5% by id hash; ``'3/8'`` -> bucket 3 of 8; None -> everything."""
    if not spec:
        return 0, 1, 1.0
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", spec.strip()):
        return 0, 1, float(m.group(1)) / 100
    if m := re.fullmatch(r"(\d+)/(\d+)", spec.strip()):
        bucket, buckets = int(m.group(1)), int(m.group(2))
        if 0 <= bucket < buckets:
            return bucket, buckets, 1.0
    raise PalaceEtlError(f"parse --sample {spec!r}: expected N% or B/N with 0 <= B < N")


def in_sample(drawer_id: str, sample: tuple[int, int, float]) -> bool:
    bucket, buckets, frac = sample
    h = int.from_bytes(hashlib.sha256(drawer_id.encode()).digest()[:8], "big")
    return h % buckets == bucket and (frac >= 1.0 or (h >> 16) % 10_000 < frac * 10_000)


def verify_palace(layout: PalaceLayout, embedder: EmbedderIdentity, against: tuple[str, Path] | None = None,
                  sample: str | None = None, probes: int = 200, full: bool = False) -> VerifyReport:
    if layout.is_server:
        raise PalaceEtlError("verify a server palace: not supported yet", hint="verify a local palace or bundle")
    if not chroma_sqlite.palace_db(layout.path).exists():
        raise SourceMissing(f"verify palace {layout.path}: no chroma.sqlite3 there")
    report = VerifyReport(layout.location)
    spec = parse_sample(sample)
    if not _check_structure(layout, embedder, report, full):
        return report
    _check_kg(layout, report, full)
    _check_ledger(layout, report)
    probe_ids = _probe_ids(layout, spec, probes)  # read SQLite before this process opens a Chroma client
    store = VectorStore(layout)
    try:
        if against is not None:
            _check_parity(layout, store, against, spec, report)
        else:
            report.not_checked.append("parity with a source (give --against KIND PATH)")
        _probe(store, probe_ids, report, layout)
    finally:
        store.close()
    return report


def _check_structure(layout: PalaceLayout, embedder: EmbedderIdentity, report: VerifyReport, full: bool) -> bool:
    db = chroma_sqlite.palace_db(layout.path)
    problems = chroma_sqlite.quick_check(db, full)
    if problems:
        report.add("error", "sqlite_corrupt", f"{db}: {'; '.join(problems[:5])}",
                   f"mempalace --palace {layout.path} repair --mode from-sqlite")
    with chroma_sqlite.open_ro(db) as conn:
        if "METADATA" not in chroma_sqlite.segments(conn):
            report.add("error", "collection_missing", f"{layout.path} has no mempalace_drawers collection",
                       f"palace-etl import ... --palace {layout.path}")
            return False
        meta = chroma_sqlite.collection_metadata(conn)
        report.totals["drawers"] = chroma_sqlite.count(conn)
        (dim,) = conn.execute("SELECT dimension FROM collections WHERE name='mempalace_drawers'").fetchone()
    if meta.get("hnsw:space") != "cosine":
        report.add("error", "collection_not_cosine", f"hnsw:space is {meta.get('hnsw:space')!r}, MemPalace "
                   "reads similarity as 1 - cosine distance", f"mempalace --palace {layout.path} repair rebuild-index")
    recorded = read_sidecar(layout.path)
    if recorded is None:
        report.add("warning", "embedder_unrecorded", "no mempalace_embedder.json: MemPalace 3.11 will warn",
                   f"mempalace --palace {layout.path} palace set-embedder --model {embedder.model_name}")
    elif recorded.model_name != embedder.model_name:
        report.add("error", "embedder_mismatch", f"sidecar records {recorded}, vectors here are {embedder}",
                   f"mempalace --palace {layout.path} repair rebuild-index")
    if dim and recorded and recorded.dimension and dim != recorded.dimension:
        report.add("error", "dimension_mismatch", f"collection vectors are {dim}-d, sidecar says "
                   f"{recorded.dimension}", f"mempalace --palace {layout.path} repair rebuild-index")
    return True


def _check_kg(layout: PalaceLayout, report: VerifyReport, full: bool) -> None:
    if not layout.kg_path.exists():
        report.not_checked.append(f"knowledge graph ({layout.kg_path} does not exist)")
        return
    problems = chroma_sqlite.quick_check(layout.kg_path, full)
    if problems:
        report.add("error", "kg_corrupt", f"{layout.kg_path}: {'; '.join(problems[:5])}",
                   f"restore the knowledge graph from a bundle: palace-etl restore BUNDLE --palace {layout.path}")
        return
    with KnowledgeGraph(layout.kg_path) as kg:
        report.totals["triples"] = kg.counts()["triples"]
        dangling = kg.query("SELECT t.id FROM triples t WHERE t.subject NOT IN (SELECT id FROM entities) "
                            "OR t.object NOT IN (SELECT id FROM entities)")
    if dangling:
        report.add("error", "kg_dangling", f"{len(dangling)} triples name entities that do not exist, e.g. "
                   f"{', '.join(r[0] for r in dangling[:3])}", "re-run the import that wrote them")


def _check_ledger(layout: PalaceLayout, report: VerifyReport) -> None:
    if not (layout.state_dir / "ledger.sqlite3").exists():
        return
    ledger = Ledger(layout.state_dir)
    try:
        for run in ledger.runs():
            if run["status"] != "complete":
                report.add("error", "run_incomplete", f"import run {run['run_id']} ({run['importer']} "
                           f"{run['source']}) is {run['status']}",
                           f"palace-etl import {run['importer']} {run['source']} --palace {layout.path}")
    finally:
        ledger.close()


def _check_parity(layout: PalaceLayout, store: VectorStore, against: tuple[str, Path], spec, report) -> None:
    kind, path = against
    importer = get_importer(kind)
    if not Path(path).exists():
        raise SourceMissing(f"verify against {kind} {path}: no such file or directory")
    missing, changed, triples_missing, checked = [], [], [], 0
    kg = KnowledgeGraph(layout.kg_path) if layout.kg_path.exists() else None
    try:
        for batch in importer.batches(Path(path), ImportOptions(), Quarantine()):
            kind_ = batch_kind(batch)
            if kind_ == DRAWERS:
                rows = [r for r in batch.select(["id", "wing", "room", "content_sha256"]).to_pylist()
                        if in_sample(r["id"], spec)]
                got = store.get([r["id"] for r in rows], include=("metadatas",))
                have = dict(zip(got["ids"], got["metadatas"]))
                for r in rows:
                    checked += 1
                    m = have.get(r["id"])
                    if m is None:
                        missing.append(r["id"])
                    elif (m.get("content_sha256"), m.get("wing"), m.get("room")) != (
                            r["content_sha256"], r["wing"], r["room"]):
                        changed.append(r["id"])
            elif kind_ == TRIPLES:
                ids = batch.column("id").to_pylist()
                present = set() if kg is None else {row[0] for row in kg.query(
                    f"SELECT id FROM triples WHERE id IN ({','.join('?' * len(ids))})", ids)}
                triples_missing += [i for i in ids if i not in present]
    finally:
        if kg is not None:
            kg.close()
    remedy = f"palace-etl import {kind} {path} --palace {layout.path}"
    if missing:
        report.add("error", "drawer_missing", f"{len(missing)} of {checked} source drawers are not in the palace: "
                   f"{', '.join(missing[:MAX_LISTED])}", remedy)
    if changed:
        report.add("error", "drawer_changed", f"{len(changed)} drawers differ from the source (content or "
                   f"wing/room): {', '.join(changed[:MAX_LISTED])}", remedy)
    if triples_missing:
        report.add("error", "triple_missing", f"{len(triples_missing)} source triples are not in the knowledge "
                   f"graph: {', '.join(triples_missing[:MAX_LISTED])}", remedy)


def _probe_ids(layout: PalaceLayout, spec, probes: int) -> list[str]:
    """A deterministic sample of drawer ids, read from SQLite (no unpaged Chroma get)."""
    with chroma_sqlite.open_ro(chroma_sqlite.palace_db(layout.path)) as conn:
        seg = chroma_sqlite.segments(conn)["METADATA"]
        ids = [r[0] for r in conn.execute("SELECT embedding_id FROM embeddings WHERE segment_id = ?", (seg,))]
    return sorted((i for i in ids if in_sample(i, spec)), key=lambda i: hashlib.sha256(i.encode()).digest())[:probes]


def _probe(store: VectorStore, ids: list[str], report: VerifyReport, layout: PalaceLayout) -> None:
    if not ids:
        return
    col = store.reading()
    got = col.get(ids=ids, include=["embeddings"])
    vecs = np.asarray(got["embeddings"], dtype=np.float32)
    res = col.query(query_embeddings=vecs, n_results=1, include=[])
    hits = sum(1 for want, top in zip(got["ids"], res["ids"]) if top and top[0] == want)
    report.totals["probes"] = len(ids)
    report.totals["self_hits"] = hits
    report.totals["self_hit_rate"] = hits / len(ids)
    if hits / len(ids) < SELF_HIT_THRESHOLD:
        report.add("error", "hnsw_self_query_miss", f"{len(ids) - hits} of {len(ids)} drawers queried with their "
                   "own vector do not rank themselves first: the HNSW index is damaged",
                   f"mempalace --palace {layout.path} repair rebuild-index")

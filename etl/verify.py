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
from typing import Sequence

import numpy as np

from importers.base import ImportOptions
from importers.quarantine import Quarantine
from importers.registry import get_importer
from importers.schema import DRAWERS, TRIPLES, batch_kind
from palace import chroma_sqlite
from palace.errors import (
    ModelNotInstalled,
    PalaceEtlError,
    SourceMissing,
    VerificationFailed,
)
from palace.kg import KnowledgeGraph
from palace.layout import PalaceLayout, read_sidecar
from palace.vectors import VectorStore

from .embed import MINILM, Embedder, EmbedderIdentity, MiniLMEmbedder
from .ids import content_sha256
from .runs import Ledger

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


def check_verified(report: dict) -> None:
    """Raise ``VerificationFailed`` when a verify report (``VerifyReport.to_dict()``) has findings."""
    findings = report["findings"]
    if findings:
        first = findings[0]
        raise VerificationFailed(f"verify {report['palace']}: {len(findings)} problem(s), first: {first['code']}",
                                 hint=first.get("remedy"))


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
    if buckets == 1 and frac >= 1.0:  # no --sample: everything, without hashing every id
        return True
    h = int.from_bytes(hashlib.sha256(drawer_id.encode()).digest()[:8], "big")
    return h % buckets == bucket and (frac >= 1.0 or (h >> 16) % 10_000 < frac * 10_000)


@dataclass
class _Facts:
    """What the structure checks need to know about the drawers collection."""

    count: int
    metadata: dict
    dimension: int | None
    ids: list[str]
    log: dict | None = None  # vector index vs SQLite bookkeeping (local palaces)


def _local_facts(layout: PalaceLayout) -> _Facts | None:
    """Read from chroma.sqlite3 directly: before this process opens a Chroma client on it."""
    with chroma_sqlite.open_ro(chroma_sqlite.palace_db(layout.path)) as conn:
        seg = chroma_sqlite.segments(conn).get("METADATA")
        if seg is None:
            return None
        (dim,) = conn.execute("SELECT dimension FROM collections WHERE name='mempalace_drawers'").fetchone()
        ids = [r[0] for r in conn.execute("SELECT embedding_id FROM embeddings WHERE segment_id = ?", (seg,))]
        return _Facts(len(ids), chroma_sqlite.collection_metadata(conn), dim, ids, chroma_sqlite.log_coverage(conn))


def _server_facts(store: VectorStore) -> _Facts | None:
    try:
        col = store.reading()
    except PalaceEtlError:
        return None
    ids = [i for _, i, _, _ in store.scan(())]
    first = col.get(limit=1, include=["embeddings"])["embeddings"]
    dim = len(first[0]) if len(first) else None
    return _Facts(len(ids), dict(col.metadata or {}), dim, ids)


def verify_palace(layout: PalaceLayout, embedder: EmbedderIdentity | None = None, lock_timeout: float = 5.0,
                  against: Sequence[tuple[str, Path]] = (), sample: str | None = None, probes: int = 200,
                  full: bool = False, wing: str | None = None) -> VerifyReport:
    """Palace health, then parity with each ``(kind, path)`` source in ``against``: the health checks
    and the read of the palace's rows happen once, however many source files are compared."""
    report = VerifyReport(layout.location)
    spec = parse_sample(sample)
    for kind, path in against:
        get_importer(kind)
        if not Path(path).exists():
            raise SourceMissing(f"verify against {kind} {path}: no such file or directory")
    if layout.is_server:
        report.not_checked.append("SQLite integrity of chroma.sqlite3 (server palace: verify its directory on "
                                  "the server host)")
    else:
        if not chroma_sqlite.palace_db(layout.path).exists():
            raise SourceMissing(f"verify palace {layout.path}: no chroma.sqlite3 there")
        if not _check_chroma_sqlite(layout, report, full):
            report.not_checked.append("everything that reads chroma.sqlite3 (it is damaged)")
            _check_kg(layout, report, full)
            return report
    _check_kg(layout, report, full)
    _check_ledger(layout, report)
    store = VectorStore(layout, lock_timeout=lock_timeout)
    try:
        facts = _server_facts(store) if layout.is_server else _local_facts(layout)
        if facts is None:
            report.add("error", "collection_missing", f"{layout.location} has no mempalace_drawers collection",
                       f"palace-etl import ... --palace {layout.location}")
            return report
        _check_structure(layout, embedder, facts, report)
        if against:
            held = _ServerRows(store) if layout.is_server else _local_rows(layout, spec)
            for source in against:
                _check_parity(layout, held, source, spec, report, wing)
        else:
            report.not_checked.append("parity with a source (give --against KIND PATH)")
        _probe(store, sample_ids(facts.ids, spec, probes), report, layout, read_sidecar(layout.sidecar_dir))
    finally:
        store.close()
    return report


def _check_chroma_sqlite(layout: PalaceLayout, report: VerifyReport, full: bool) -> bool:
    db = chroma_sqlite.palace_db(layout.path)
    problems = chroma_sqlite.quick_check(db, full)
    if problems:
        report.add("error", "sqlite_corrupt", f"{db}: {'; '.join(problems[:5])}",
                   f"keep the palace as it is; run `palace-etl verify --palace {layout.location} --full`, then "
                   f"restore the newest bundle into a new directory and compare: palace-etl restore BUNDLE "
                   f"--palace NEW_DIR && palace-etl verify --palace {layout.location} --palace NEW_DIR")
    return not problems


def _check_structure(layout: PalaceLayout, embedder: EmbedderIdentity | None, facts: _Facts,
                     report: VerifyReport) -> None:
    """Collection settings; the sidecar identity against the vectors (and ``--embedder`` when given)."""
    report.totals["drawers"] = facts.count
    where = layout.location
    if facts.metadata.get("hnsw:space") != "cosine":
        report.add("error", "collection_not_cosine", f"hnsw:space is {facts.metadata.get('hnsw:space')!r}, "
                   "MemPalace reads similarity as 1 - cosine distance", f"mempalace --palace {where} repair rebuild-index")
    recorded = read_sidecar(layout.sidecar_dir)
    if recorded is None:
        report.add("warning", "embedder_unrecorded", "no mempalace_embedder.json: MemPalace 3.11 will warn",
                   f"mempalace --palace {where} palace set-embedder --model "
                   f"{embedder.model_name if embedder else 'MODEL'}")
    elif embedder is not None and recorded.model_name != embedder.model_name:
        report.add("error", "embedder_mismatch", f"sidecar records {recorded}, vectors here are {embedder}",
                   f"mempalace --palace {where} repair rebuild-index")
    log = facts.log
    if log and log["vector_seq"] < log["metadata_seq"] and (
            log["log_min"] is None or log["log_min"] > log["vector_seq"] + 1 or log["log_max"] < log["metadata_seq"]):
        report.add("error", "hnsw_behind_sqlite", f"the vector index persisted up to log entry {log['vector_seq']}, "
                   f"SQLite rows go to {log['metadata_seq']}, and the log that would replay the gap is gone "
                   f"(it holds {log['log_min']}..{log['log_max']}): vectors are missing",
                   f"mempalace --palace {where} repair rebuild-index")
    elif layout.is_server:
        report.not_checked.append("vector index vs SQLite bookkeeping (server palace)")
    if facts.dimension and recorded and recorded.dimension and facts.dimension != recorded.dimension:
        report.add("error", "dimension_mismatch", f"collection vectors are {facts.dimension}-d, sidecar says "
                   f"{recorded.dimension}", f"mempalace --palace {where} repair rebuild-index")


def _check_kg(layout: PalaceLayout, report: VerifyReport, full: bool) -> None:
    if not layout.kg_path.exists():
        report.not_checked.append(f"knowledge graph ({layout.kg_path} does not exist)")
        return
    problems = chroma_sqlite.quick_check(layout.kg_path, full)
    if problems:
        report.add("error", "kg_corrupt", f"{layout.kg_path}: {'; '.join(problems[:5])}",
                   f"restore the knowledge graph from a bundle: palace-etl restore BUNDLE --palace {layout.location}")
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
                           f"palace-etl import {run['importer']} {run['source']} --palace {layout.location}")
    finally:
        ledger.close()


def _import_options(layout: PalaceLayout, kind: str, path: Path, wing: str | None) -> ImportOptions:
    """Re-read a source with the options it was imported with (the ledger has them); ``--wing`` overrides."""
    used: dict = {}
    if (layout.state_dir / "ledger.sqlite3").exists():
        ledger = Ledger(layout.state_dir)
        try:
            used = ledger.options_for(kind, path) or {}
        finally:
            ledger.close()
    if wing is not None:
        used["wing"] = wing
    return ImportOptions(**used)


Held = dict[str, tuple[str, str | None, str | None]]  # id -> (content sha256, wing, room)


class _LocalRows(dict):
    """Every drawer's content hash, wing and room, read once: a lookup is the dict itself."""

    def lookup(self, ids: list[str]) -> Held:
        return self


def _local_rows(layout: PalaceLayout, spec) -> _LocalRows:
    """Every drawer's content hash, wing and room, straight from chroma.sqlite3 (read-only, in pages,
    before this process opens a Chroma client on it)."""
    held = _LocalRows()
    with chroma_sqlite.open_ro(chroma_sqlite.palace_db(layout.path)) as conn:
        seg = chroma_sqlite.segments(conn).get("METADATA")
        after = -1
        keys = ("chroma:document", "wing", "room")
        while seg is not None and (page := chroma_sqlite.page_fields(conn, seg, after, 10_000, keys)):
            for _, i, m in page:
                if in_sample(i, spec):
                    held[i] = (content_sha256(m.get("chroma:document") or ""), m.get("wing"), m.get("room"))
            after = page[-1][0]
    return held


class _ServerRows:
    """The same lookup for a server palace, asked per source batch."""

    def __init__(self, store: VectorStore):
        self.store = store

    def lookup(self, ids: list[str]) -> Held:
        got = self.store.get(ids, include=("metadatas", "documents"))
        return {i: (content_sha256(d or ""), (m or {}).get("wing"), (m or {}).get("room"))
                for i, d, m in zip(got["ids"], got["documents"], got["metadatas"])}


def _check_parity(layout: PalaceLayout, held: _LocalRows | _ServerRows, against: tuple[str, Path], spec, report,
                  wing: str | None = None) -> None:
    kind, path = against
    importer = get_importer(kind)
    options = _import_options(layout, kind, Path(path), wing)
    missing, changed, triples_missing, checked = [], [], [], 0
    kg = KnowledgeGraph(layout.kg_path) if layout.kg_path.exists() else None
    try:
        for batch in importer.batches(Path(path), options, Quarantine()):
            kind_ = batch_kind(batch)
            if kind_ == DRAWERS:
                rows = [r for r in batch.select(["id", "wing", "room", "content_sha256"]).to_pylist()
                        if in_sample(r["id"], spec)]
                have = held.lookup([r["id"] for r in rows])
                for r in rows:
                    checked += 1
                    if r["id"] not in have:
                        missing.append(r["id"])
                    elif have[r["id"]] != (r["content_sha256"], r["wing"], r["room"]):
                        changed.append(r["id"])  # the stored text itself is hashed, not the hash in its metadata
            elif kind_ == TRIPLES:
                ids = batch.column("id").to_pylist()
                present = set() if kg is None else {row[0] for row in kg.query(
                    f"SELECT id FROM triples WHERE id IN ({','.join('?' * len(ids))})", ids)}
                triples_missing += [i for i in ids if i not in present]
    finally:
        if kg is not None:
            kg.close()
    remedy = f"palace-etl import {kind} {path} --palace {layout.location}" + (
        f" --wing '{options.wing}'" if options.wing else "")
    if missing:
        report.add("error", "drawer_missing", f"{len(missing)} of {checked} source drawers are not in the palace: "
                   f"{', '.join(missing[:MAX_LISTED])}", remedy)
    if changed:
        report.add("error", "drawer_changed", f"{len(changed)} drawers differ from the source (content or "
                   f"wing/room): {', '.join(changed[:MAX_LISTED])}", remedy)
    if triples_missing:
        report.add("error", "triple_missing", f"{len(triples_missing)} source triples are not in the knowledge "
                   f"graph: {', '.join(triples_missing[:MAX_LISTED])}", remedy)


def self_query(store: VectorStore, ids: list[str], embedder: Embedder | None = None) -> tuple[int, int]:
    """Query each drawer with its own vector; return (probes, drawers that ranked themselves first).

    With ``embedder`` the query vector is the drawer's document re-embedded, so a
    mislabelled index cannot vouch for itself; without, the vector read back from
    the index is used. A drawer tied at the top with an identical twin counts as found.
    """
    if not ids:
        return 0, 0
    col = store.reading()
    try:
        got = col.get(ids=ids, include=["documents"] if embedder else ["embeddings"])
    except Exception:  # the index cannot even hand back its vectors: every probe misses
        return len(ids), 0
    vectors = embedder.embed(got["documents"]) if embedder else np.asarray(got["embeddings"], dtype=np.float32)
    k = min(5, len(got["ids"]))
    try:
        res = col.query(query_embeddings=vectors, n_results=k, include=["distances"])
        answers = list(zip(res["ids"], res["distances"]))
    except Exception:  # a damaged index raises ("Error finding id"): find which probes it fails on
        answers = [_query_one(col, v, k) for v in vectors]
    hits = 0
    for want, (found, dist) in zip(got["ids"], answers):
        if found and want in found and dist[found.index(want)] <= dist[0] + 1e-5:
            hits += 1
    return len(got["ids"]), hits


def _query_one(col, vector: np.ndarray, k: int) -> tuple[list, list]:
    try:
        res = col.query(query_embeddings=vector[None, :], n_results=k, include=["distances"])
        return res["ids"][0], res["distances"][0]
    except Exception:
        return [], []


def probe_embedder(identity: EmbedderIdentity | None) -> Embedder | None:
    """The palace's own embedder when it is the default one and installed, else None (read-back probes)."""
    if identity is None or identity.model_name != MINILM.model_name:
        return None
    try:
        return MiniLMEmbedder()
    except ModelNotInstalled:
        return None


def sample_ids(ids: list[str], spec, limit: int) -> list[str]:
    """A deterministic sample: ids in the sample spec, ordered by their hash."""
    return sorted((i for i in ids if in_sample(i, spec)), key=lambda i: hashlib.sha256(i.encode()).digest())[:limit]


def _probe(store: VectorStore, ids: list[str], report: VerifyReport, layout: PalaceLayout,
           identity: EmbedderIdentity | None) -> None:
    if not ids:
        return
    embedder = probe_embedder(identity)
    if embedder is None:
        report.not_checked.append("retrieval probes used the index's own vectors (the palace's embedder is not "
                                  "available here), which a mislabelled index can pass")
    probes, hits = self_query(store, ids, embedder)
    if not probes:
        return
    report.totals.update(probes=probes, self_hits=hits, self_hit_rate=hits / probes)
    if hits / probes < SELF_HIT_THRESHOLD:
        report.add("error", "hnsw_self_query_miss", f"{probes - hits} of {probes} drawers queried with their "
                   "own vector do not rank themselves first: the HNSW index is damaged",
                   f"mempalace --palace {layout.location} repair rebuild-index")


def verify_bundle_report(bundle: Path) -> VerifyReport:
    """``verify --bundle``: every file's sha256 and row counts against the manifest, along the chain."""
    from exporters.bundle import verify_chain as verify_bundle
    from exporters.manifest import BundleError

    report = VerifyReport(str(bundle))
    if not Path(bundle).exists():
        raise SourceMissing(f"verify bundle {bundle}: no such directory")
    try:
        problems = verify_bundle(Path(bundle))
    except BundleError as exc:
        problems = [str(exc)]
    for p in problems:
        report.add("error", "bundle_corrupt", p, f"palace-etl export --palace PALACE --out {Path(bundle).parent}")
    report.not_checked.append("vector and retrieval checks (a bundle: restore it, then verify the palace)")
    return report


def verify_parity(spec_a: str, spec_b: str, kg_a: Path | None = None, kg_b: Path | None = None,
                  sample: str | None = None, probes: int = 200) -> VerifyReport:
    """Two replicas (palace, server, or bundle directory) hold the same rows, and the same vectors."""
    from .replicas import TABLES, open_replica

    a, b = open_replica(spec_a, kg_a), open_replica(spec_b, kg_b)
    report = VerifyReport(f"{a.name} <-> {b.name}")
    spec = parse_sample(sample)
    try:
        a.verified()
        b.verified()
        sa, sb = a.snapshot(), b.snapshot()
        for t in TABLES:
            A, B = sa.get(t, {}), sb.get(t, {})
            only_a = sorted(i for i in A.keys() - B.keys() if in_sample(i, spec))
            only_b = sorted(i for i in B.keys() - A.keys() if in_sample(i, spec))
            changed = sorted(i for i in A.keys() & B.keys() if A[i] != B[i] and in_sample(i, spec))
            remedy = f"palace-etl sync {spec_a} {spec_b}"
            for code, ids, where in (("replica_missing", only_a, f"only in {a.name}"),
                                     ("replica_extra", only_b, f"only in {b.name}"),
                                     ("replica_changed", changed, "different on the two sides")):
                if ids:
                    report.add("error", code, f"{len(ids)} {t} {where}: {', '.join(ids[:MAX_LISTED])}", remedy)
        report.totals["drawers"] = len(sa.get("drawers", {}))
        report.totals["triples"] = len(sa.get("triples", {}))
        both = sample_ids(sorted(sa.get("drawers", {}).keys() & sb.get("drawers", {}).keys()), spec, probes)
        va = {r["id"]: r["embedding"] for page in a.fetch("drawers", both) for r in page}
        vb = {r["id"]: r["embedding"] for page in b.fetch("drawers", both) for r in page}
        low = []
        for i in both:
            x, y = np.asarray(va[i], dtype=np.float32), np.asarray(vb[i], dtype=np.float32)
            cos = float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12))
            if cos < 0.9999:
                low.append(i)
        report.totals["probes"] = len(both)
        if low:
            report.add("error", "vector_mismatch", f"{len(low)} of {len(both)} sampled drawers have different "
                       f"vectors on the two sides: {', '.join(low[:MAX_LISTED])}",
                       f"palace-etl sync {spec_a} {spec_b} --prefer A")
    finally:
        a.close()
        b.close()
    report.not_checked.append("retrieval probes (run verify --palace on each side)")
    return report

"""``palace-etl verify``: prove a palace is healthy and holds what its source held.

Phases run cheapest first: structure (files, collection settings, embedder
identity) -> bookkeeping (SQLite quick_check, ledger, KG dangling ids) -> parity
with a source (ids, content hashes, wing/room, triples) -> retrieval probes
(each sampled drawer queried with its own vector must rank itself first; a drawer
the index holds another vector for is damage, while a few the graph search did not
reach, with their vectors intact, are what an approximate index does).
Every finding has a severity, a code, a message and the command that fixes it.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from exporters.bundle import forget_hashes
from importers.base import ImportOptions
from importers.quarantine import Quarantine
from importers.registry import get_importer
from importers.schema import DRAWERS, TRIPLES, batch_kind
from palace.bundles import is_sealed, readable, verify_chain
from palace.chroma_sqlite import journal_is_hot, palace_db
from palace.crypt import CryptError, Keys, Tampered
from palace.errors import (
    ModelNotInstalled,
    PalaceEtlError,
    SourceMissing,
    VerificationFailed,
)
from palace.ids import content_sha256
from palace.manifest import BundleError
from palace.rows import TABLES
from palace.stores import CollectionInfo, PalaceStore, RoutedIds, open_store

from .embed import MINILM, Embedder, EmbedderIdentity, MiniLMEmbedder
from .runs import DONE, Ledger

REPORT_SCHEMA_VERSION = 1
UNREACHED_TOLERANCE = 0.01  # share of probes an intact HNSW graph may fail to reach before it is called damaged
INTACT = 1e-4  # cosine distance within which two vectors are the same drawer's (re-embedded elsewhere, or a replica's)
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
                                                  "self_hit_rate": 1.0, "unreached": 0, "triples": 0})

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


def verify_palace(store: PalaceStore, embedder: EmbedderIdentity | None = None,
                  against: Sequence[tuple[str, Path]] = (), sample: str | None = None, probes: int = 200,
                  full: bool = False, wing: str | None = None) -> VerifyReport:
    """Palace health, then parity with each ``(kind, path)`` source in ``against``: the health checks
    and the read of the palace's rows happen once, however many source files are compared."""
    report = VerifyReport(store.name)
    spec = parse_sample(sample)
    for kind, path in against:
        get_importer(kind)
        if not Path(path).exists():
            raise SourceMissing(f"verify against {kind} {path}: no such file or directory")
    store.verified()
    chroma_sound, kg_sound = _check_integrity(store, report, full)
    if kg_sound:
        _check_kg(store, report)
    if not chroma_sound:
        report.not_checked.append("everything that reads chroma.sqlite3 (it is damaged)")
        return report
    _check_ledger(store, report)
    info = store.info("drawers")
    if info is None:
        report.add("error", "collection_missing", f"{store.name} has no mempalace_drawers collection",
                   f"palace-etl import ... --palace {store.name}")
        return report
    _check_structure(store, embedder, info, report)
    if against:
        held = _held_rows(store, spec)
        for source in against:
            _check_parity(store, held, source, spec, report, wing)
    else:
        report.not_checked.append("parity with a source (give --against KIND PATH)")
    if not probes:
        report.not_checked.append("retrieval probes (--probes 0)")
        return report
    ids = [i for page in store.rows("drawers", ()) for i, _, _ in page]
    _probe(store, sample_ids(ids, spec, probes), report, store.identity())
    return report


def _check_integrity(store: PalaceStore, report: VerifyReport, full: bool) -> tuple[bool, bool]:
    """SQLite integrity of the palace's files; (chroma.sqlite3 sound, KG sound)."""
    chroma_sound = kg_sound = True
    for path, problems in store.integrity(full):
        is_kg = path == store.kg_path
        if problems is None:
            report.not_checked.append(f"SQLite integrity of {path} ({store.name} is a server palace or a bundle: "
                                      "verify its files where they live)")
        elif problems and is_kg:
            kg_sound = False
            report.add("error", "kg_corrupt", f"{path}: {'; '.join(problems[:5])}",
                       f"restore the knowledge graph from a bundle: palace-etl restore BUNDLE --palace {store.name}")
        elif problems:
            chroma_sound = False
            report.add("error", "sqlite_corrupt", f"{path}: {'; '.join(problems[:5])}",
                       f"keep the palace as it is; run `palace-etl verify --palace {store.name} --full`, then "
                       f"restore the newest bundle into a new directory and compare: palace-etl restore BUNDLE "
                       f"--palace NEW_DIR && palace-etl verify --palace {store.name} --palace NEW_DIR")
    db = palace_db(store.root) if store.root is not None else None
    if chroma_sound and db is not None and journal_is_hot(db):  # another process holds it: the check read a copy
        report.add("warning", "interrupted_write",
                   f"{db}-journal: the rollback journal of a write killed mid-transaction. The data is intact "
                   "(checked on a rolled-back copy); SQLite rolls the journal back on the next read-write open. "
                   "Until then a MemPalace 3.11 server refuses every write, saying the palace must be repaired: "
                   "it reads the file read-only and takes this for corruption. Do not repair it.",
                   f"an import through the hub rolls it back and has it re-check; or stop the MemPalace "
                   f"server, run `palace-etl status --palace {store.name}` (it rolls the journal back), and "
                   "start the server again")
    return chroma_sound, kg_sound


def _check_structure(store: PalaceStore, embedder: EmbedderIdentity | None, info: CollectionInfo,
                     report: VerifyReport) -> None:
    """Collection settings; the sidecar identity against the vectors (and ``--embedder`` when given)."""
    report.totals["drawers"] = info.count
    where = store.name
    if info.settings.get("hnsw:space") != "cosine":
        report.add("error", "collection_not_cosine", f"hnsw:space is {info.settings.get('hnsw:space')!r}, "
                   "MemPalace reads similarity as 1 - cosine distance", f"mempalace --palace {where} repair rebuild-index")
    recorded = store.identity()
    if recorded is None:
        report.add("warning", "embedder_unrecorded", "no mempalace_embedder.json: MemPalace 3.11 will warn",
                   f"mempalace --palace {where} palace set-embedder --model "
                   f"{embedder.model_name if embedder else 'MODEL'}")
    elif embedder is not None and recorded.model_name != embedder.model_name:
        report.add("error", "embedder_mismatch", f"sidecar records {recorded}, vectors here are {embedder}",
                   f"mempalace --palace {where} repair rebuild-index")
    log = info.log
    if log and log["vector_seq"] < log["metadata_seq"] and (
            log["log_min"] is None or log["log_min"] > log["vector_seq"] + 1 or log["log_max"] < log["metadata_seq"]):
        report.add("error", "hnsw_behind_sqlite", f"the vector index persisted up to log entry {log['vector_seq']}, "
                   f"SQLite rows go to {log['metadata_seq']}, and the log that would replay the gap is gone "
                   f"(it holds {log['log_min']}..{log['log_max']}): vectors are missing",
                   f"mempalace --palace {where} repair rebuild-index")
    elif log is None:
        report.not_checked.append(f"vector index vs SQLite bookkeeping ({store.name} does not show it)")
    if info.dimension and recorded and recorded.dimension and info.dimension != recorded.dimension:
        report.add("error", "dimension_mismatch", f"collection vectors are {info.dimension}-d, sidecar says "
                   f"{recorded.dimension}", f"mempalace --palace {where} repair rebuild-index")


def _check_kg(store: PalaceStore, report: VerifyReport) -> None:
    path = store.kg_path
    if path is None or not path.exists():
        report.not_checked.append(f"knowledge graph ({path or 'the store has no KG file'} does not exist)")
        return
    with store.knowledge_graph(read_only=True) as kg:
        report.totals["triples"] = kg.counts()["triples"]
        dangling = kg.query("SELECT t.id FROM triples t WHERE t.subject NOT IN (SELECT id FROM entities) "
                            "OR t.object NOT IN (SELECT id FROM entities)")
    if dangling:
        report.add("error", "kg_dangling", f"{len(dangling)} triples name entities that do not exist, e.g. "
                   f"{', '.join(r[0] for r in dangling[:3])}", "re-run the import that wrote them")


def _check_ledger(store: PalaceStore, report: VerifyReport) -> None:
    with Ledger.reading(store.state_dir) as ledger:
        for run in ledger.runs() if ledger else []:
            if run["status"] not in DONE:
                report.add("error", "run_incomplete", f"import run {run['run_id']} ({run['importer']} "
                           f"{run['source']}) is {run['status']}",
                           f"palace-etl import {run['importer']} {run['source']} --palace {store.name}")


def _import_options(store: PalaceStore, kind: str, path: Path, wing: str | None) -> ImportOptions:
    """Re-read a source with the options it was imported with (the ledger has them); ``--wing`` overrides."""
    with Ledger.reading(store.state_dir) as ledger:
        used = (ledger.options_for(kind, path) if ledger else None) or {}
    if wing is not None:
        used["wing"] = wing
    return ImportOptions(**used)


Held = dict[str, tuple[str, str | None, str | None]]  # id -> (content sha256, wing, room)


def _held_rows(store: PalaceStore, spec) -> Held:
    """Every sampled drawer's content hash, wing and room, read once (for a palace directory straight
    from chroma.sqlite3, before this process opens a Chroma client on it). A drawer filed through a
    hub is also held under our id: its chunks' text, joined (``routed.sqlite3`` maps them)."""
    held: Held = {}
    routed = {i: r for i, r in RoutedIds.read(store.state_dir).items() if in_sample(i, spec)}
    chunks = {c for _, ids, _ in routed.values() for c in ids}
    parts: dict[str, tuple[str, str | None, str | None]] = {}
    for page in store.rows("drawers", ("document", "wing", "room")):
        for i, d, m in page:
            if in_sample(i, spec):
                held[i] = (content_sha256(d or ""), m.get("wing"), m.get("room"))
            if i in chunks:
                parts[i] = (d or "", m.get("wing"), m.get("room"))
    for i, (_, ids, _) in routed.items():  # filed through a hub under its own ids: held under ours too
        if i not in held and all(c in parts for c in ids):
            held[i] = (content_sha256("".join(parts[c][0] for c in ids)), *parts[ids[0]][1:])
    return held


def _check_parity(store: PalaceStore, held: Held, against: tuple[str, Path], spec, report,
                  wing: str | None = None) -> None:
    kind, path = against
    importer = get_importer(kind)
    options = _import_options(store, kind, Path(path), wing)
    missing, changed, triples_missing, checked = [], [], [], 0
    kg = store.knowledge_graph(read_only=True) if store.kg_path is not None and store.kg_path.exists() else None
    try:
        for batch in importer.batches(Path(path), options, Quarantine()):
            kind_ = batch_kind(batch)
            if kind_ == DRAWERS:
                rows = [r for r in batch.select(["id", "wing", "room", "content_sha256"]).to_pylist()
                        if in_sample(r["id"], spec)]
                for r in rows:
                    checked += 1
                    if r["id"] not in held:
                        missing.append(r["id"])
                    elif held[r["id"]] != (r["content_sha256"], r["wing"], r["room"]):
                        changed.append(r["id"])  # the stored text itself is hashed, not the hash in its metadata
            elif kind_ == TRIPLES:
                ids = batch.column("id").to_pylist()
                present = set() if kg is None else {row[0] for row in kg.query(
                    f"SELECT id FROM triples WHERE id IN ({','.join('?' * len(ids))})", ids)}
                triples_missing += [i for i in ids if i not in present]
    finally:
        if kg is not None:
            kg.close()
    remedy = f"palace-etl import {kind} {path} --palace {store.name}" + (
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


@dataclass
class ProbeResult:
    """What the self-queries found: ``hits`` drawers ranked themselves first; of the others, the
    index held the drawer's own vector but its graph search did not reach it (``unreached``), or
    it held another vector for it, or none (``misplaced``)."""
    probes: int = 0
    hits: int = 0
    unreached: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)


def self_query(store: PalaceStore, ids: list[str], embedder: Embedder | None = None) -> ProbeResult:
    """Query each drawer with its own vector, and look closer at those that do not rank first.

    With ``embedder`` the query vector is the drawer's document re-embedded, so a
    mislabelled index cannot vouch for itself; without, the vector read back from
    the index is used. A drawer tied at the top with an identical twin counts as found.
    """
    if not ids:
        return ProbeResult()
    try:
        rows = [r for page in store.fetch("drawers", ids, vectors=embedder is None) for r in page]
    except PalaceEtlError:  # the palace cannot be opened at all (it says why, and the remedy)
        raise
    except Exception:  # the index cannot even hand back its vectors: every probe misses
        return ProbeResult(len(ids), 0, [], list(ids))
    if not rows:
        return ProbeResult()
    vectors = embedder.embed([r["document"] for r in rows]) if embedder else \
        np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    k = min(5, len(rows))
    answers = store.nearest("drawers", vectors, k)
    result, missed = ProbeResult(len(rows)), []
    for r, v, (found, dist) in zip(rows, vectors, answers):
        if found and r["id"] in found and dist[found.index(r["id"])] <= dist[0] + 1e-5:
            result.hits += 1
        else:
            missed.append((r["id"], v, found, dist))
    held = _index_vectors(store, [m[0] for m in missed]) if embedder else {i: v for i, v, _, _ in missed}
    for i, v, found, dist in missed:
        own = _cosine_distance(v, held[i]) if i in held else None
        if own is None or own > INTACT:
            result.misplaced.append(i)
        elif len(found) == k and dist[-1] <= own + 1e-5:  # k identical twins filled every place
            result.hits += 1
        else:
            result.unreached.append(i)
    return result


def _index_vectors(store: PalaceStore, ids: list[str]) -> dict[str, np.ndarray]:
    """The vectors the index holds for ``ids`` (none when it cannot hand them back)."""
    if not ids:
        return {}
    try:
        return {r["id"]: np.asarray(r["embedding"], dtype=np.float32)
                for page in store.fetch("drawers", ids, vectors=True) for r in page}
    except PalaceEtlError:
        raise
    except Exception:
        return {}


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return 1.0 - float(np.dot(a, b)) / (na * nb) if na and nb else 1.0


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


def _probe(store: PalaceStore, ids: list[str], report: VerifyReport, identity: EmbedderIdentity | None) -> None:
    if not ids:
        return
    embedder = probe_embedder(identity)
    if embedder is None:
        report.not_checked.append("retrieval probes used the index's own vectors (the palace's embedder is not "
                                  "available here), which a mislabelled index can pass")
    found = self_query(store, ids, embedder)
    if not found.probes:
        return
    report.totals.update(probes=found.probes, self_hits=found.hits, self_hit_rate=found.hits / found.probes,
                         unreached=len(found.unreached))
    remedy = f"mempalace --palace {store.name} repair rebuild-index"
    if found.misplaced:
        report.add("error", "hnsw_self_query_miss", f"{len(found.misplaced)} of {found.probes} drawers queried with "
                   "their own vector do not rank themselves first, and the index holds another vector for them, "
                   f"or none: the HNSW index is damaged: {', '.join(found.misplaced[:MAX_LISTED])}", remedy)
    if len(found.unreached) > UNREACHED_TOLERANCE * found.probes:
        report.add("error", "hnsw_self_query_miss", f"{len(found.unreached)} of {found.probes} drawers hold their "
                   f"own vector in the index, but its graph search does not reach them (more than "
                   f"{UNREACHED_TOLERANCE:.0%}): the HNSW index is damaged: "
                   f"{', '.join(found.unreached[:MAX_LISTED])}", remedy)


def verify_bundle_report(bundle: Path, keys: Keys | None = None) -> VerifyReport:
    """``verify --bundle``: every file's sha256 and row counts against the manifest, along the chain.
    An encrypted chain's ciphertexts are checked without a key; with ``keys`` it is decrypted and its
    plaintext sha256s and row counts are checked too."""
    report = VerifyReport(str(bundle))
    if not Path(bundle).exists():
        raise SourceMissing(f"verify bundle {bundle}: no such directory")
    try:
        problems = verify_chain(Path(bundle))
        sealed = not problems and is_sealed(Path(bundle))
    except BundleError as exc:
        problems, sealed = [str(exc)], False
    if problems:  # so the remedy works: the next export re-reads the chain, finds it damaged, writes it whole
        forget_hashes(Path(bundle).parent)
    for p in problems:
        report.add("error", "bundle_corrupt", p, f"palace-etl export --palace PALACE --out {Path(bundle).parent}")
    if sealed and keys is None:
        report.not_checked.append("row counts and plaintext checksums (the bundle is encrypted: pass --identity "
                                  "or --passphrase-file to decrypt and check them)")
    elif sealed:
        try:
            with readable(Path(bundle), keys):
                pass
        except Tampered as exc:
            report.add("error", "bundle_corrupt", str(exc), exc.hint)
        except CryptError as exc:
            report.add("error", "bundle_key", str(exc), exc.hint)
        except BundleError as exc:
            report.add("error", "bundle_corrupt", str(exc), f"palace-etl export --palace PALACE --out "
                       f"{Path(bundle).parent}")
    report.not_checked.append("vector and retrieval checks (a bundle: restore it, then verify the palace)")
    return report


def verify_parity(spec_a: str, spec_b: str, kg_a: Path | None = None, kg_b: Path | None = None,
                  sample: str | None = None, probes: int = 200, keys: Keys | None = None) -> VerifyReport:
    """Two replicas (palace, server, or bundle directory) hold the same rows, and the same vectors."""
    a, b = open_store(spec_a, kg_a, read_only=True, keys=keys), open_store(spec_b, kg_b, read_only=True, keys=keys)
    report = VerifyReport(f"{a.name} <-> {b.name}")
    spec = parse_sample(sample)
    try:
        a.verified()
        b.verified()
        sa, sb = a.snapshot(), b.snapshot()
        for t in TABLES:
            held_a, held_b = sa.get(t, {}), sb.get(t, {})
            only_a = sorted(i for i in held_a.keys() - held_b.keys() if in_sample(i, spec))
            only_b = sorted(i for i in held_b.keys() - held_a.keys() if in_sample(i, spec))
            changed = sorted(i for i in held_a.keys() & held_b.keys() if held_a[i] != held_b[i] and in_sample(i, spec))
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
        low = [i for i in both if _cosine_distance(np.asarray(va[i], dtype=np.float32),
                                                   np.asarray(vb[i], dtype=np.float32)) > INTACT]
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

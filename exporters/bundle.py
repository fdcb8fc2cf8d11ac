"""``export`` to Parquet bundles: verified, incremental, restorable backups of a whole palace.

The format and its one writer are ``palace.bundles``; this module decides what goes in. A bundle
of the whole palace with nothing to diff against reads every row once (``scan``) and hashes what
it read. Otherwise the snapshot (ids and row hashes, no vectors; re-hashing only rows whose change
marks moved) is diffed against the newest bundle's ``state.parquet``; only the rows that changed
are fetched, with their vectors, a page per palace-lock hold, and streamed into the bundle. A row
another writer deleted between the snapshot and the fetch is recorded as vanished and left out of
the bundle's state; when an earlier bundle of the chain holds it, the deletion is this bundle's
tombstone, so the chain restores exactly what the state says.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from palace.bundles import (
    BundleContent,
    Owner,
    bundle_dir_lock,
    bundle_state,
    chain,
    list_bundles,
    remember_export,
    state_batch,
    usable_parent,
    write_bundle,
)
from palace.crypt import Sealer
from palace.errors import SourceMissing
from palace.hashed import HashRecord
from palace.layout import atomic_dir
from palace.manifest import SEALED, BundleError, Manifest
from palace.rows import (
    COLLECTIONS,
    KG_TABLES,
    State,
    collection_row_hash,
    kg_row_hash,
    records_batch,
)
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
    wing: str | None = None
    encrypted: bool = False
    rehashed_because: str | None = None  # why an incremental re-read every row instead of the changed ones
    named_after: str | None = None  # why the bundle is not named by the clock (behind the newest bundle)
    others: list = field(default_factory=list)  # ``out``'s bundles of another owner (``Owner``): left alone


def _cache_dir(out: Path) -> Path:
    """Where the plaintext state of the newest encrypted bundle of ``out`` is kept on this machine, so
    a cron export that holds only public keys can still write an incremental."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "palace-etl" / "bundle-state" / hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:24]


def forget_cached_state(out: Path) -> bool:
    """Drop this machine's copy of ``out``'s newest encrypted state (it names the rows it held)."""
    cache = _cache_dir(Path(out))
    if cache.is_dir():
        shutil.rmtree(cache)
        return True
    return False


def _state_file(m: Manifest) -> str | None:
    """The sha256 of a bundle's state file (what binds this machine's cache to that bundle)."""
    return m.files.get("state.parquet" + SEALED) if m.sealed else m.files.get("state.parquet")


def _remember(out: Path, m: Manifest, state: State, scope: dict, palace: str, marks: dict | None) -> None:
    """Keep, for the next incremental from this machine, what the bundle ``m`` just written into ``out``
    cannot tell it in the clear: the palace's change marks (``marks.json``) and, for an encrypted
    bundle, its ``state``; bound to that bundle's name and its state file's sha256."""
    outer = Manifest.load(out / m.name)
    cache = _cache_dir(out)
    cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_dir(cache, f".tmp-{cache.name}-", replace=True) as tmp:
        if outer.sealed:
            pq.write_table(pa.Table.from_batches([state_batch(state)]), tmp / "state.parquet", compression="zstd")
        if marks is not None:
            (tmp / "marks.json").write_bytes(orjson.dumps(marks))
        (tmp / "bundle.json").write_bytes(orjson.dumps(scope | {
            "bundle": m.name, "state_sha256": _state_file(outer), "palace": palace}))


def _cached(out: Path, prev: Path) -> dict | None:
    """This machine's record of ``prev`` (``bundle.json``), when it is the bundle the cache was written for."""
    try:
        meta = orjson.loads((_cache_dir(out) / "bundle.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("bundle") != prev.name or \
            meta.get("state_sha256") != _state_file(Manifest.load(prev)):
        return None
    return meta


def _marks(out: Path, prev: Path | None, palace: str) -> dict | None:
    """The change marks recorded with ``prev`` by this machine's export of ``palace``, if any."""
    meta = None if prev is None else _cached(out, prev)
    if meta is None or meta.get("palace") != palace:
        return None
    try:
        marks = orjson.loads((_cache_dir(out) / "marks.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return marks if isinstance(marks, dict) and isinstance(marks.get("rows"), dict) else None


def _remembered(out: Path, prev: Path, scope: dict) -> tuple[State | None, str | None]:
    """(the state of the encrypted bundle ``prev``, None), or (None, why it cannot be used)."""
    cache = _cache_dir(out)
    meta = _cached(out, prev)
    if meta is None or not (cache / "state.parquet").is_file():
        return None, f"the newest bundle {prev.name} is encrypted and this machine did not write it"
    if {k: meta.get(k) for k in scope} != scope:
        return None, f"the newest bundle {prev.name} is encrypted to other keys or holds another wing"
    return bundle_state(cache), None


def _hash_record(out: Path) -> HashRecord:
    """The sha256s this machine took of ``out``'s bundle files: the chain an incremental extends is
    checked every night, but a file unchanged since this machine hashed it is not read again."""
    return HashRecord(_hash_record_path(out))


def _hash_record_path(out: Path) -> Path:
    cache = _cache_dir(out)
    return cache.with_name(cache.name + ".sha256.json")


def forget_hashes(out: Path) -> bool:
    """Drop this machine's record of ``out``'s sha256s: after a bundle there was found damaged, the
    next export re-reads the chain it would extend (and writes a full bundle instead). An export
    running meanwhile does not save it back. False when there was none, or it cannot be written."""
    try:
        return HashRecord.drop(_hash_record_path(Path(out)))
    except OSError:
        return False


def _parent(bundles: list[Path], out: Path, incremental: bool, full_every: int, scope: dict,
            hashes: HashRecord) -> tuple[Path | None, State, str | None]:
    """The bundle an incremental chains onto (None: write a full one), the state it recorded, and
    why not when it cannot: the newest of ``bundles`` (this machine's of this palace). An
    incremental chains only onto a bundle of the same scope: the same wing, encrypted to the same
    keys (or both plain)."""
    if not incremental or not bundles:
        return None, {}, None
    prev, why = usable_parent(bundles[-1], hashes)
    if prev is None:
        return None, {}, why
    if len(chain(prev)) >= full_every:
        return None, {}, None  # a full bundle every N incrementals
    m = Manifest.load(prev)
    if m.sealed:
        if scope["encryption"] is None:
            return None, {}, f"the newest bundle {prev.name} is encrypted and this export is not; writing a full bundle"
        state, why = _remembered(out, prev, scope)
        return (prev, state, None) if state is not None else (None, {}, why + "; writing a full bundle")
    if scope["encryption"] is not None:
        return None, {}, f"the newest bundle {prev.name} is not encrypted; writing a full encrypted bundle"
    if m.wing != scope["wing"]:
        return None, {}, (f"the newest bundle {prev.name} holds {'wing ' + m.wing if m.wing else 'the whole palace'}; "
                          "writing a full bundle")
    return prev, bundle_state(prev), None


def _wing_ids(store: PalaceStore, table: str, wing: str) -> set[str]:
    return {i for page in store.rows(table, fields=("wing",)) for i, _doc, meta in page if meta.get("wing") == wing}


def export_bundle(store: PalaceStore, out: Path, incremental: bool = False, full_every: int = 7,
                  dry_run: bool = False, wing: str | None = None, sealer: Sealer | None = None,
                  host: str | None = None) -> ExportReport:
    """Write a bundle of ``store`` into ``out``: the whole palace, or with ``wing`` that wing's
    drawers and closets only (no knowledge graph: its triples are not filed by wing); encrypted
    with ``sealer``. It chains onto only the bundles ``host`` (this machine when None) exported of
    the same palace and wing (``Owner``)."""
    if not store.exists():
        raise SourceMissing(f"export palace {store.name}: no palace there")
    out = Path(out)
    root = store.root
    if root is not None and out.resolve().is_relative_to(root):
        raise BundleError(f"export --out {out}: it is inside the palace {root}; a bundle there would be "
                          "taken for the palace's own files", hint="write bundles outside the palace")
    scope = {"wing": wing, "encryption": sealer.describe() if sealer else None}
    hashes = _hash_record(out)
    with bundle_dir_lock(out), ThreadPoolExecutor(1) as pool:
        # a head start on the palace's private copy while the bundles are checked
        ready = pool.submit(store.prepare, incremental and wing is None)
        try:
            owner = Owner(store.name, wing, host)
            ours, theirs = owner.split(list_bundles(out))
            others = [b.name for b in theirs]
            prev, old, full_because = _parent(ours, out, incremental, full_every, scope, hashes)
            recorded = _marks(out, prev, store.name) if wing is None and old else None
        finally:
            ready.exception()  # waits; what failed there fails again, and is reported, where it is needed
        if wing is None and not old and not dry_run:  # every row goes in: read each once
            return replace(_export_whole(store, out, prev, scope, sealer, full_because, hashes, owner), others=others)
        marks, rehashed_because = None, None
        if wing is None:  # marks speak for the whole palace: a wing's bundle re-reads its rows
            state, marks, rehashed_because = store.changes(old, recorded)
        else:
            state = store.snapshot()
            keep = {t: _wing_ids(store, t, wing) for t in COLLECTIONS}
            state = {t: {i: h for i, h in rows.items() if i in keep.get(t, ())} for t, rows in state.items()}
            if not any(state.values()):
                raise SourceMissing(f"export --wing {wing}: palace {store.name} has no drawer or closet in that wing",
                                    hint=f"palace-etl status --palace {store.name} lists its wings")
        changed = {t: _changed(rows, old.get(t, {})) for t, rows in state.items()}
        gone = [(t, i) for t, rows in old.items() for i in sorted(rows.keys() - state.get(t, {}).keys())]
        report = ExportReport(None, "incremental" if prev else "full", prev.name if prev else None,
                              counts={t: len(v) for t, v in changed.items()},
                              totals={t: len(v) for t, v in state.items()}, deleted=gone, dry_run=dry_run,
                              full_because=full_because, wing=wing, encrypted=sealer is not None,
                              rehashed_because=rehashed_because if prev else None, others=others)
        if dry_run:
            return report
        vanished: dict[str, list[str]] = {t: [] for t in state}
        content = _content(store, state, gone, wing)
        for table in COLLECTIONS:
            info = store.info(table)
            content.settings[table] = info.settings if info else {}
            if changed[table] and info and info.dimension:
                content.collections[table] = (info.dimension, _batches(store, table, changed[table], info.dimension,
                                                                       content, old, vanished))
        for table in KG_TABLES:
            if changed[table]:
                rows = [r for page in store.fetch(table, changed[table]) for r in page]
                _drop_vanished(table, changed[table], {r["id"] for r in rows}, content, old, vanished)
                content.kg[table] = rows
        content.watermark = lambda: {"vanished": {t: len(v) for t, v in vanished.items() if v}}
        return _written(store, out, prev, content, sealer, scope, marks, report, hashes, owner)


def _changed(rows: dict[str, str], was: dict[str, str]) -> list[str]:
    """The ids whose hash is not what it was (new ones included), sorted."""
    get = was.get
    return sorted([i for i, h in rows.items() if get(i) != h])


def _content(store: PalaceStore, state: State, gone: list, wing: str | None) -> BundleContent:
    ident = store.identity()
    return BundleContent(
        palace=store.name, state=state, tombstones=gone, sidecar=store.sidecar(), wing=wing,
        embedder={"model_name": ident.model_name, "dimension": ident.dimension} if ident else None)


def _written(store: PalaceStore, out: Path, prev: Path | None, content: BundleContent, sealer: Sealer | None,
             scope: dict, marks: dict | None, report: ExportReport, hashes: HashRecord, owner: Owner) -> ExportReport:
    """Write ``content`` as the bundle, remember it, and fill ``report`` from what was written."""
    m = write_bundle(out, prev, content, sealer=sealer, hashes=hashes, owner=owner.tag)
    hashes.save()
    remember_export(store.name, out)
    if sealer is not None or marks is not None:
        _remember(out, m, content.state, scope, store.name, marks)
    report.counts = {t: m.counts.get(t, 0) for t in content.state}
    report.totals = dict(m.totals)
    report.vanished = m.watermark["vanished"]
    if m.watermark.get("named_after"):
        report.named_after = (f"the clock ({m.watermark['exported_at']}) is not past the newest bundle "
                              f"{m.watermark['named_after']}: named just after it")
    report.bundle = str(out / m.name)
    return report


def _export_whole(store: PalaceStore, out: Path, prev: Path | None, scope: dict, sealer: Sealer | None,
                  full_because: str | None, hashes: HashRecord, owner: Owner) -> ExportReport:
    """A bundle of every row (nothing to diff against): each row read once, with its vector, by
    ``scan``, and its hash taken from what was read; the change marks first, so a write landing
    during the read shows as a changed mark next time."""
    marks = store.marks()
    state: State = {t: {} for t in (*COLLECTIONS, *KG_TABLES)}
    content = _content(store, state, [], None)
    for table in COLLECTIONS:
        info = store.info(table)
        content.settings[table] = info.settings if info else {}
        if info and info.count and info.dimension:
            content.collections[table] = (info.dimension, _scanned(store, table, info.dimension, state[table]))
    for table in KG_TABLES:
        rows = [r for page in store.scan(table) for r in page]
        state[table] = {r["id"]: kg_row_hash(r) for r in rows}
        if rows:
            content.kg[table] = rows
    content.watermark = {"vanished": {}}
    report = ExportReport(None, "incremental" if prev else "full", prev.name if prev else None,
                          full_because=full_because, encrypted=sealer is not None)
    return _written(store, out, prev, content, sealer, scope, marks, report, hashes, owner)


def _scanned(store: PalaceStore, table: str, dim: int, state: dict[str, str]) -> Iterator[pa.RecordBatch]:
    """Every row of ``table`` as record batches, each row's hash put in ``state`` as it passes (the
    bundle writer writes the state after these batches)."""
    for page in store.scan(table):
        state.update((r["id"], collection_row_hash(r["document"], r["metadata"])) for r in page)
        yield records_batch(page, dim)


def _drop_vanished(table: str, wanted: list[str], found: set[str], content: BundleContent, old: State,
                   vanished: dict[str, list[str]]) -> None:
    """A row gone since the snapshot leaves the bundle's state; one the chain already holds becomes a
    tombstone of this bundle too (it was deleted during this export), or a restore of the chain would
    bring it back and the next incremental, diffing against this state, would never record it."""
    for i in wanted:
        if i not in found:
            content.state[table].pop(i, None)
            vanished[table].append(i)
            if i in old.get(table, {}):
                content.tombstones.append((table, i))


def _batches(store: PalaceStore, table: str, ids: list[str], dim: int, content: BundleContent, old: State,
             vanished: dict[str, list[str]]) -> Iterator[pa.RecordBatch]:
    """The rows of ``ids`` with their vectors as record batches, a fetched page at a time. A row gone
    since the snapshot leaves the state (``_drop_vanished``), which the bundle writer writes after
    these batches, with the tombstones."""
    found: set[str] = set()
    for s in range(0, len(ids), EXPORT_PAGE):
        for page in store.fetch(table, ids[s:s + EXPORT_PAGE]):
            found.update(r["id"] for r in page)
            yield records_batch(page, dim)
    _drop_vanished(table, ids, found, content, old, vanished)

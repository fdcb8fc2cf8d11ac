"""``palace-etl forget``: erase memories for good -- from the palace, its files, every retained
bundle, and (through sync) every replica.

The order makes an interrupted forget safe to re-run and never half done in a way that matters:
1. choose the rows (drawers by id, wing, metadata or text; the closets pointing at them; with
   ``--with-kg`` the triples filed from them and the entities left without a triple);
2. check that every bundle directory in scope can be opened and re-encrypted, before any change;
3. record the ids as forgotten (``forget-pending.json`` and the palace's sync state: from here on
   no sync brings them back and no import writes them again);
4. delete them from the palace and scrub its files (``PalaceStore.scrub``: Chroma's log, FTS index
   and free pages; the KG file; PostgreSQL's dead rows);
5. rewrite every bundle that holds them, one atomic bundle at a time, and record them as forgotten
   in each bundle directory's sync state;
6. drop the pending record. A re-run after a crash picks the pending ids up and finishes.
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from exporters.bundle import forget_cached_state
from palace.bundles import check_openable, exported_to
from palace.crypt import Keys
from palace.errors import PalaceEtlError, SourceMissing, is_disk_full
from palace.layout import atomic_write
from palace.rows import TABLES, id_key
from palace.stores import (
    BundleDirStore,
    PalaceStore,
    RoutedIds,
    SyncState,
    open_store,
    open_writer,
)
from palace.stores.routed import ROUTED_FILE

from .runs import forget_in_ledger
from .sync import KEEP_BOTH_SUFFIX, unforgotten

PENDING = "forget-pending.json"
POINTER = re.compile(r"→([^|\n]+)")  # a closet line's drawer ids: topic|entities|→id1,id2


@dataclass
class ForgetReport:
    palace: str
    dry_run: bool
    selection: dict
    removed: dict = field(default_factory=dict)  # table -> ids removed from the palace
    bundle_dirs: list = field(default_factory=list)  # the bundle directories in scope
    receipt: list = field(default_factory=list)  # what was done, file by file and bundle by bundle
    resumed: int = 0  # ids an interrupted forget left, finished by this run
    unreached: list = field(default_factory=list)  # recorded bundle directories not found
    kept_aside: list = field(default_factory=list)  # palaces a restore --force kept aside: {palace, counts}
    aside_unreached: list = field(default_factory=list)  # tables and files kept aside that forget cannot open
    unscrubbed: list = field(default_factory=list)  # bundles that could not be opened to rewrite: {bundle, why}
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"counts": {t: len(v) for t, v in self.removed.items() if v}}


def _pending_file(store: PalaceStore) -> Path:
    return store.state_dir / PENDING


def _read_pending(store: PalaceStore) -> dict:
    try:
        data = orjson.loads(_pending_file(store).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def select(store: PalaceStore, ids: list[str], wing: str | None, where: dict[str, str], match: str | None,
           with_kg: bool) -> dict[str, set[str]]:
    """The rows a forget erases. Every given criterion narrows (``--wing W --match TEXT``: W's drawers
    holding TEXT); ``ids`` take their ``--keep-both`` conflict copies with them."""
    chosen: dict[str, set[str]] = {t: set() for t in TABLES}
    wanted = set(ids)
    needle = match.casefold() if match else None
    fields = ("wing", *where, *(("document",) if needle else ()))
    for table in ("drawers", "closets"):
        for page in store.rows(table, fields=tuple(dict.fromkeys(fields))):
            for i, doc, meta in page:
                base = i.split(KEEP_BOTH_SUFFIX)[0]
                if wanted and base not in wanted:
                    continue
                if wing is not None and meta.get("wing") != wing:
                    continue
                if any(str(meta.get(k)) != v for k, v in where.items()):
                    continue
                if needle is not None and needle not in (doc or "").casefold():
                    continue
                chosen[table].add(i)
    drawers = chosen["drawers"]
    if drawers:  # closets pointing at a forgotten drawer: their lines are made from its text
        for page in store.rows("closets", fields=("document",)):
            for i, doc, _ in page:
                pointed = {p.strip() for refs in POINTER.findall(doc or "") for p in refs.split(",")}
                if pointed & drawers:
                    chosen["closets"].add(i)
    if with_kg:
        triples = [row for page in store.rows("triples") for _, _, row in page]
        entities = {i: row for page in store.rows("entities") for i, _, row in page}
        if needle is not None:
            chosen["entities"] |= {i for i, e in entities.items()
                                   if needle in f"{i} {e.get('name') or ''}".casefold()}
        for t in triples:
            text = f"{t.get('subject')} {t.get('predicate')} {t.get('object')}".casefold()
            if t.get("source_drawer_id") in drawers or t.get("subject") in chosen["entities"] \
                    or t.get("object") in chosen["entities"] or (needle is not None and needle in text):
                chosen["triples"].add(t["id"])
        kept = [t for t in triples if t["id"] not in chosen["triples"]]
        referenced = {t.get(k) for t in kept for k in ("subject", "object")}
        dropped = {t.get(k) for t in triples if t["id"] in chosen["triples"] for k in ("subject", "object")}
        chosen["entities"] |= {e for e in dropped if e in entities and e not in referenced}
    return chosen


def keyed(ids: dict[str, set[str]]) -> dict[str, set[str]]:
    return {t: {id_key(i) for i in v} for t, v in ids.items()}


def _merge(a: dict, b: dict) -> dict[str, set[str]]:
    return {t: set(a.get(t, ())) | set(b.get(t, ())) for t in TABLES}


def _remember(store: PalaceStore, chosen: dict[str, set[str]]) -> None:
    """Add ``chosen`` to the store's forgotten ids (kept as ``id_key`` hashes, in its sync state,
    which sync carries to every replica), and take them out of the rest of its sync bookkeeping."""
    s = store.sync_state()
    keys = keyed(chosen)
    merged = {t: sorted(set(s.forgotten.get(t, ())) | keys.get(t, set())) for t in TABLES}
    store.save_sync_state(SyncState(unforgotten(s.known, keys), unforgotten(s.history, keys),
                                    unforgotten(s.tombstones, keys), {t: v for t, v in merged.items() if v}))


def run_forget(spec: str, kg: Path | None = None, ids: list[str] | None = None, wing: str | None = None,
               where: list[str] | None = None, match: str | None = None, with_kg: bool = False,
               bundles: list[Path] | None = None, keys: Keys | None = None, dry_run: bool = False,
               lock_timeout: float = 30.0, wait: bool = False, notify=None) -> ForgetReport:
    started = time.monotonic()
    conditions = {}
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PalaceEtlError(f"forget --where {item!r}: expected KEY=VALUE")
        conditions[key] = value
    if match is not None and not match.strip():
        raise PalaceEtlError("forget --match: give the text to forget")
    selection = {"ids": list(ids or []), "wing": wing, "where": conditions, "match": match, "kg": with_kg}
    store = open_store(spec, kg, lock_timeout, read_only=True) if dry_run else \
        open_writer(spec, kg, lock_timeout, wait=wait, what="forget", routable=False, notify=notify)
    try:
        if store.state_dir is None:
            raise PalaceEtlError(f"forget in {store.name}: not a palace",
                                 hint="forget in the palace; its bundle directories are rewritten with --bundles")
        if not store.exists():
            raise SourceMissing(f"forget in {store.name}: no palace there")
        pending = _read_pending(store)
        if not (ids or wing or conditions or match) and not pending:
            raise PalaceEtlError("forget: say what to forget: --id, --wing, --where KEY=VALUE or --match TEXT")
        chosen = select(store, ids or [], wing, conditions, match, with_kg) if (ids or wing or conditions or match) \
            else {t: set() for t in TABLES}
        carried = {t: set(v) for t, v in pending.get("ids", {}).items()}
        chosen = _merge(chosen, carried)
        report = ForgetReport(store.name, dry_run, selection, resumed=sum(len(v) for v in carried.values()))
        report.removed = {t: sorted(v) for t, v in chosen.items()}
        recorded = exported_to(store.name)
        dirs = list(dict.fromkeys([str(Path(b).resolve()) for b in bundles or []] + recorded
                                  + pending.get("bundle_dirs", [])))
        report.unreached = [d for d in dirs if not Path(d).is_dir()]
        dirs = [d for d in dirs if Path(d).is_dir()]
        report.bundle_dirs = dirs
        for d in dirs:  # every bundle directory opens (and re-encrypts) with these keys, before any change
            check_openable(Path(d), keys, rewrite=True)
        asides = store.kept_aside()
        report.aside_unreached = [a for a in asides if not Path(a).is_dir()]
        aside_palaces = [a for a in asides if Path(a).is_dir()]
        if dry_run or not any(chosen.values()):
            _forget_aside(report, aside_palaces, chosen, selection, keys, dry_run, lock_timeout, wait, notify)
            report.seconds = round(time.monotonic() - started, 3)
            return report
        atomic_write(_pending_file(store), orjson.dumps({"ids": report.removed, "bundle_dirs": dirs}))
        _remember(store, chosen)
        for table in TABLES:
            if chosen[table]:
                store.delete(table, sorted(chosen[table]))
        store.commit()
        report.receipt += [f"{store.name}: removed " + ", ".join(f"{len(v)} {t}" for t, v in chosen.items() if v)]
        report.receipt += store.scrub(keyed(chosen))
        report.receipt += forget_in_ledger(store.state_dir, keyed(chosen))
        if (store.state_dir / ROUTED_FILE).is_file():  # what was filed through a hub, with the metadata meant
            routed = RoutedIds(store.state_dir)
            try:
                report.receipt.append(f"{store.state_dir / ROUTED_FILE}: {routed.forget(chosen['drawers'])} "
                                      "entries dropped, vacuumed")
            finally:
                routed.close()
        for d in dirs:
            replica = BundleDirStore(Path(d), keys)
            try:
                report.receipt += replica.scrub(keyed(chosen)) or [f"{d}: no bundle held them"]
                report.unscrubbed += replica.unscrubbed
                _remember(replica, chosen)
            finally:
                replica.close()
            if forget_cached_state(Path(d)):
                report.receipt.append(f"{d}: this machine's copy of its newest encrypted state dropped "
                                      "(the next export there is a full bundle)")
        _forget_aside(report, aside_palaces, chosen, selection, keys, dry_run, lock_timeout, wait, notify)
        if not report.unscrubbed:  # else it stays pending: a re-run, once they are repaired, rewrites them
            _pending_file(store).unlink()
        report.seconds = round(time.monotonic() - started, 3)
        return report
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError or is_disk_full(exc):  # locked, full: not damage
            raise
        raise PalaceEtlError(f"forget in {store.name}: a database of the palace is damaged ({exc}); stopped",
                             hint=f"palace-etl verify --palace {store.name} --full") from None
    finally:
        store.close()


def _forget_aside(report: ForgetReport, palaces: list[str], chosen: dict[str, set[str]], selection: dict,
                  keys: Keys | None, dry_run: bool, lock_timeout: float, wait: bool, notify) -> None:
    """The same forget in each palace a restore --force kept aside beside this one: it holds what the
    palace held before the restore. The same selection, or, for a forget resumed with none, the
    ids chosen here."""
    given = selection["ids"] or selection["wing"] or selection["where"] or selection["match"]
    ids = selection["ids"] if given else sorted(chosen["drawers"] | chosen["closets"])
    for palace in palaces:
        if not (given or ids):
            break
        try:
            sub = run_forget(palace, None, ids, selection["wing"] if given else None,
                             [f"{k}={v}" for k, v in selection["where"].items()] if given else None,
                             selection["match"] if given else None, selection["kg"], None, keys, dry_run,
                             lock_timeout, wait, notify)
        except PalaceEtlError as exc:  # a copy kept aside that cannot be read does not stop the forget
            report.aside_unreached.append(f"{palace} ({exc})")
            continue
        report.kept_aside.append({"palace": palace, "counts": sub.to_dict()["counts"]})
        report.receipt += [f"{palace} (kept aside by a restore): {line}" for line in sub.receipt]

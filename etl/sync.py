"""``palace-etl sync A B``: make two replicas hold the same drawers, closets and KG.

Each replica keeps, per row id, the hashes of the versions it has seen superseded (its own
edits since its last sync, and every version that lost or was replaced in a sync, carried on
from peer to peer). When the two sides hold different versions of a row and one side's version
is in the other's history, the other side's is newer and wins: it was made from it, or beat it
in an earlier sync. Otherwise both changed it independently: a conflict, resolved by
last-writer-wins on the row's own timestamp with the row hash as a deterministic tie-break, or
``--prefer``, or ``--keep-both``. Because histories travel, a conflict settled in one pair stays
settled when the losing version reaches a third replica.
Deletions travel as tombstones: a deletion beats an edit made before it, a row written after the
deletion lives, and ``--prefer`` decides either way; an invalidated triple beats an open one.
Vectors travel with their rows. The state is saved only after both sides were written and found
equal, so an interrupted sync re-runs to the same result.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field

from palace.clock import instant, now_utc, zone
from palace.crypt import Keys
from palace.errors import PalaceEtlError, PalaceLocked, VerificationFailed
from palace.rows import COLLECTIONS, TABLES, State, id_key
from palace.stores import PalaceStore, SyncState, open_store, open_writer, store_root

from .embed import check_identity
from .runs import forget_in_ledger

KEEP_BOTH_SUFFIX = "__conflict_"
HISTORY_KEEP = 32  # superseded versions remembered per row
History = dict[str, dict[str, list[str]]]  # table -> {id: [row hashes this side saw superseded]}
Tombstones = dict[str, dict[str, str]]  # table -> {id: when it was deleted (UTC ISO)}


@dataclass
class Side:
    """One replica of a sync: its store, what it holds now, and the versions it saw superseded."""

    store: PalaceStore
    label: str  # "a" or "b"
    state: State
    history: History
    marks: dict | None = None  # the store's change marks ``state`` was taken with
    rehashed_because: str | None = None  # why every row was read and hashed, not only the changed ones


@dataclass
class SyncPlan:
    to_a: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TABLES})
    to_b: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TABLES})
    delete_a: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TABLES})
    delete_b: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TABLES})
    keep_both: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {t: [] for t in TABLES})
    conflicts: list[dict] = field(default_factory=list)

    def counts(self) -> dict:
        return {k: {t: len(v) for t, v in getattr(self, k).items() if v}
                for k in ("to_a", "to_b", "delete_a", "delete_b", "keep_both")}

    def moves(self) -> int:
        return sum(len(v) for k in ("to_a", "to_b", "delete_a", "delete_b", "keep_both")
                   for v in getattr(self, k).values())

    def copy_to(self, side: str) -> dict[str, list[str]]:
        return self.to_a if side == "a" else self.to_b

    def delete_on(self, side: str) -> dict[str, list[str]]:
        return self.delete_a if side == "a" else self.delete_b


@dataclass
class SyncReport:
    a: str
    b: str
    dry_run: bool
    plan: dict
    conflicts: list
    moved: int = 0
    converged: bool | None = None
    differences: dict = field(default_factory=dict)
    forgotten: dict = field(default_factory=dict)  # side -> rows erased there because a replica forgot them
    scrubbed: list = field(default_factory=list)  # what was scrubbed on a side that learned of a forget
    rehashed: dict = field(default_factory=dict)  # side -> why it read every row, not only the changed ones
    went_back: dict = field(default_factory=dict)  # side -> why no deletion was inferred from it (older than its last sync)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_converged(report: dict) -> None:
    """Raise ``VerificationFailed`` when a sync ran (``SyncReport.to_dict()``) but the sides still differ."""
    if report["converged"] is False:
        tables = ", ".join(f"{n['count']} {t}" for t, n in report["differences"].items())
        raise VerificationFailed(f"sync {report['a']} {report['b']}: the replicas still differ ({tables})",
                                 hint="re-run the same sync; if it stays, compare with palace-etl verify "
                                      f"--palace {report['a']} --palace {report['b']}")


def row_time(table: str, row: dict, naive_zone: dt.tzinfo) -> float:
    """When a row was last written, as far as the row itself says, as a UTC instant (for
    last-writer-wins); -inf when it says nothing usable. Naive drawer stamps are local time of the
    replica holding the row (``naive_zone``); naive KG stamps are SQLite's UTC."""
    if table in COLLECTIONS:
        m = row.get("metadata") or {}
        stamps, zone_ = (m.get("last_modified"), m.get("updated_at"), m.get("filed_at")), naive_zone
    else:
        stamps, zone_ = (row.get("extracted_at"), row.get("created_at")), dt.timezone.utc
    for s in stamps:
        when = instant(s, zone_)
        if when is not None:
            return when
    return float("-inf")


def local_deletions(known: State | None, current: State, tombstones: Tombstones, now: str) -> Tombstones:
    """Tombstones plus the ids this replica held at its last sync and no longer holds (deleted at
    ``now``, UTC ISO; tombstones stored by older versions are naive local time of the sync host)."""
    out = {t: dict(v) for t, v in tombstones.items()}
    for t, rows in (known or {}).items():
        for i in rows.keys() - current.get(t, {}).keys():
            out.setdefault(t, {}).setdefault(i, now)
    return out


def tombstone_time(when: str) -> float:
    t = instant(when, zone(None))
    return float("-inf") if t is None else t


def merge_tombstones(x: Tombstones, y: Tombstones) -> Tombstones:
    """Both sides' tombstones; an id deleted on both keeps the later deletion (compared as instants)."""
    out = {t: dict(v) for t, v in x.items()}
    for t, rows in y.items():
        for i, when in rows.items():
            mine = out.get(t, {}).get(i, when)
            out.setdefault(t, {})[i] = when if tombstone_time(when) >= tombstone_time(mine) else mine
    return out


def local_history(known: State | None, current: State, history: History) -> History:
    """The stored history plus this replica's own edits since its last sync (the version it replaced)."""
    out = {t: {i: list(h) for i, h in rows.items()} for t, rows in history.items()}
    for t, rows in (known or {}).items():
        cur = current.get(t, {})
        for i, h in rows.items():
            if cur.get(i, h) != h:
                out.setdefault(t, {})[i] = _union(out.get(t, {}).get(i, []), [h])
    return out


def merged_history(a: Side, b: Side, final: State) -> History:
    """After a sync both sides hold ``final``: every version either side saw, minus the one now held."""
    out: History = {}
    for t, rows in final.items():
        held_a, held_b = a.state.get(t, {}), b.state.get(t, {})
        seen_a, seen_b = a.history.get(t, {}), b.history.get(t, {})
        for i, h in rows.items():
            seen = [v for v in _union(seen_a.get(i, []), seen_b.get(i, []), [held_a.get(i), held_b.get(i)])
                    if v and v != h]
            if seen:
                out.setdefault(t, {})[i] = seen[-HISTORY_KEEP:]
    return out


def _union(*lists: list) -> list:
    return list(dict.fromkeys(v for vs in lists for v in vs))


def plan_sync(a: Side, b: Side, tombs: Tombstones, prefer: str | None, keep_both: bool) -> SyncPlan:
    """What moves where; ``tombs`` are the ids deleted anywhere (with when), merged from both sides."""
    plan = SyncPlan()
    undecided, revived = [], []
    for t in TABLES:
        held_a, held_b, deleted = a.state.get(t, {}), b.state.get(t, {}), tombs.get(t, {})
        seen_a, seen_b = a.history.get(t, {}), b.history.get(t, {})
        for i in sorted(held_a.keys() | held_b.keys()):
            version_a, version_b = held_a.get(i), held_b.get(i)
            if version_a == version_b:
                continue
            if version_a is None or version_b is None:
                holder = "a" if version_b is None else "b"
                if i in deleted:
                    revived.append((t, i, holder))  # deleted somewhere: unless re-created since
                else:
                    plan.copy_to("b" if holder == "a" else "a")[t].append(i)
                continue
            a_saw_b, b_saw_a = version_b in seen_a.get(i, ()), version_a in seen_b.get(i, ())
            if a_saw_b and not b_saw_a:
                plan.to_b[t].append(i)
            elif b_saw_a and not a_saw_b:
                plan.to_a[t].append(i)
            else:
                undecided.append((t, i))
    _deletions(a, b, revived, tombs, plan, prefer)
    _resolve(a, b, undecided, plan, prefer, keep_both)
    return plan


def _deletions(a: Side, b: Side, items: list, tombs: Tombstones, plan: SyncPlan, prefer: str | None) -> None:
    """A row one side holds and a replica deleted goes, unless it was written after the deletion
    (a re-creation) or ``--prefer`` names the side that holds it. Either way it is a listed conflict."""
    for t in TABLES:
        for holder in (a, b):
            other = "b" if holder.label == "a" else "a"
            ids = [i for tt, i, s in items if tt == t and s == holder.label]
            if not ids:
                continue
            rows = _rows_by_id(holder.store, t, ids)
            for i in ids:
                newer = i in rows and row_time(t, rows[i], holder.store.zone) > tombstone_time(tombs[t][i])
                if prefer == holder.label or (prefer is None and newer):
                    tombs[t].pop(i)  # it lives, everywhere
                    plan.copy_to(other)[t].append(i)
                    winner, rule = holder.label, "prefer" if prefer else "written after the deletion"
                else:
                    plan.delete_on(holder.label)[t].append(i)
                    winner, rule = other, "prefer" if prefer else "deletion wins"
                plan.conflicts.append({"table": t, "id": i, "winner": winner, "rule": rule})


def _rows_by_id(store: PalaceStore, table: str, ids: list[str]) -> dict[str, dict]:
    return {r["id"]: r for page in store.fetch(table, ids) for r in page}


def _resolve(a: Side, b: Side, undecided: list, plan: SyncPlan, prefer: str | None, keep_both: bool) -> None:
    """Both sides changed the same id since the last sync: pick a winner per conflict."""
    for t in TABLES:
        ids = [i for tt, i in undecided if tt == t]
        if not ids:
            continue
        rows_a, rows_b = _rows_by_id(a.store, t, ids), _rows_by_id(b.store, t, ids)
        for i in ids:  # both sides hold the row, both changed it
            ra, rb = rows_a[i], rows_b[i]
            if prefer:
                winner, why = prefer, "prefer"
            elif t == "triples" and bool(ra.get("valid_to")) != bool(rb.get("valid_to")):
                winner, why = ("a" if ra.get("valid_to") else "b"), "invalidation beats open triple"
            else:
                key_a = (row_time(t, ra, a.store.zone), a.state[t][i])
                key_b = (row_time(t, rb, b.store.zone), b.state[t][i])
                winner, why = ("a" if key_a > key_b else "b"), "last writer wins"
            plan.conflicts.append({"table": t, "id": i, "winner": winner, "rule": why})
            plan.copy_to("b" if winner == "a" else "a")[t].append(i)
            if keep_both and t in COLLECTIONS:
                plan.keep_both[t].append((i, "b" if winner == "a" else "a"))


def _apply(a: PalaceStore, b: PalaceStore, plan: SyncPlan) -> int:
    """Carry out ``plan``. The rows each side gives are read from its ``read_view``, taken before
    anything is written (a private copy where that reads faster)."""
    # capture the losing versions kept under new ids before the winners overwrite them (conflicts are few)
    kept: dict[str, list[dict]] = {}
    for t, items in plan.keep_both.items():
        for side, store in (("a", a), ("b", b)):
            ids = [i for i, s in items if s == side]
            kept.setdefault(t, []).extend(dict(r, id=f"{r['id']}{KEEP_BOTH_SUFFIX}{side}")
                                          for page in store.fetch(t, ids) for r in page)
    moved = 0
    read_a, read_b = (store.read_view(sum(len(ids[t]) for t in COLLECTIONS))
                      for store, ids in ((a, plan.to_b), (b, plan.to_a)))
    for src, dst, ids, deletes in ((read_a, b, plan.to_b, plan.delete_b), (read_b, a, plan.to_a, plan.delete_a)):
        for t in TABLES:
            if deletes[t]:
                dst.delete(t, deletes[t])
                moved += len(deletes[t])
            for page in src.fetch(t, ids[t]):  # streamed: vectors travel a page at a time
                dst.write(t, page)
                moved += len(page)
    for t, rows in kept.items():
        if rows:
            a.write(t, rows)
            b.write(t, rows)
            moved += 2 * len(rows)
    a.commit()
    b.commit()
    return moved


def _differences(sa: State, sb: State) -> dict:
    out = {}
    for t in TABLES:
        held_a, held_b = sa.get(t, {}), sb.get(t, {})
        diff = sorted(i for i in held_a.keys() | held_b.keys() if held_a.get(i) != held_b.get(i))
        if diff:
            out[t] = {"count": len(diff), "first": diff[:10]}
    return out


def _side(store: PalaceStore, label: str, saved: SyncState) -> Side:
    """What ``store`` holds now: only the rows whose change marks moved since its last sync are read
    and hashed, where the store keeps marks and the saved ones still apply."""
    state, marks, why = store.changes(saved.known or {}, saved.marks if saved.known is not None else None)
    return Side(store, label, state, local_history(saved.known, state, saved.history), marks,
                why if saved.known is not None else None)  # a first sync reads every row anyway


def _open_side(spec: str, kg, lock_timeout: float, dry_run: bool, wait: bool, notify,
               keys: Keys | None) -> tuple[PalaceStore, PalaceLocked | None]:
    """A replica opened for the sync: its writer, or -- when a MemPalace server holds it that a sync
    cannot write through -- its lock-free reader, with the refusal to raise if the plan writes into it."""
    if dry_run:
        return open_store(spec, kg, lock_timeout, read_only=True, keys=keys), None
    try:
        return open_writer(spec, kg, lock_timeout, wait=wait, what="sync", routable=False, notify=notify,
                           keys=keys), None
    except PalaceLocked as live:
        return open_store(spec, kg, lock_timeout, read_only=True, keys=keys), live


def _erase(side: Side, forgotten: dict[str, set[str]]) -> dict[str, list[str]]:
    """Take the rows a replica forgot out of ``side``'s state (so the plan never copies them) and
    return them: they are deleted there, outside ``--max-delete`` (forget asked for exactly these)."""
    out = {}
    for t in TABLES:
        held, gone = side.state.get(t, {}), forgotten.get(t, set())
        out[t] = sorted(i for i in held if gone and id_key(i) in gone)
        for i in out[t]:
            held.pop(i)
    return out


def unforgotten(tables: dict | None, forgotten: dict[str, set[str]]) -> dict | None:
    """``{table: {id: ...}}`` without the ids whose ``id_key`` is in ``forgotten``: what a replica
    remembers names none of them."""
    if tables is None:
        return None
    return {t: {i: v for i, v in rows.items() if not forgotten.get(t) or id_key(i) not in forgotten[t]}
            for t, rows in tables.items()}


def _writes_into(plan: SyncPlan, side: str) -> bool:
    return any(plan.copy_to(side).values()) or any(plan.delete_on(side).values()) or any(plan.keep_both.values())


def run_sync(spec_a: str, spec_b: str, kg_a=None, kg_b=None, dry_run: bool = False, prefer: str | None = None,
             keep_both: bool = False, max_delete: int | None = None, lock_timeout: float = 30.0,
             wait: bool = False, notify=None, keys: Keys | None = None) -> SyncReport:
    """Sync two replicas. A replica a live MemPalace server holds is read from a private copy; the
    sync goes ahead when the plan writes only into the other one, and is refused (``PalaceLocked``,
    nothing written) when it would write into the live one. ``wait`` waits for its lease first.
    ``keys`` open (and re-encrypt into) an encrypted bundle replica."""
    started = time.monotonic()
    if store_root(spec_a) == store_root(spec_b):
        raise PalaceEtlError(f"sync {spec_a} {spec_b}: both name the same directory; give two different replicas")
    store_a, live_a = _open_side(spec_a, kg_a, lock_timeout, dry_run, wait, notify, keys)
    try:
        store_b, live_b = _open_side(spec_b, kg_b, lock_timeout, dry_run, wait, notify, keys)
    except BaseException:
        store_a.close()
        raise
    try:
        store_a.verified()
        store_b.verified()
        ia, ib = store_a.identity(), store_b.identity()
        if ia and ib:
            check_identity(ia, ib)  # vectors of another model never travel
        saved_a, saved_b = store_a.sync_state(), store_b.sync_state()
        a, b = _side(store_a, "a", saved_a), _side(store_b, "b", saved_b)
        forgotten = {t: set(saved_a.forgotten.get(t, ())) | set(saved_b.forgotten.get(t, ())) for t in TABLES}
        erase = {"a": _erase(a, forgotten), "b": _erase(b, forgotten)}  # never copied, never planned
        now = now_utc()
        tombs = merge_tombstones(local_deletions(saved_a.known, a.state, saved_a.tombstones, now),
                                 local_deletions(saved_b.known, b.state, saved_b.tombstones, now))
        plan = plan_sync(a, b, tombs, prefer, keep_both)
        deletes = sum(len(plan.delete_a[t]) + len(plan.delete_b[t]) for t in COLLECTIONS)
        limit = max_delete if max_delete is not None else \
            max(10, len(a.state["drawers"]) // 20, len(b.state["drawers"]) // 20)
        if deletes > limit:
            raise PalaceEtlError(f"sync {store_a.name} {store_b.name}: the plan deletes {deletes} drawers/closets, "
                                 f"more than --max-delete {limit}; nothing written",
                                 hint="check with --dry-run, then raise --max-delete if it is meant")
        for side, live in (("a", live_a), ("b", live_b)):
            if live is not None and (_writes_into(plan, side) or (side == "a" and ib and not ia)
                                     or (side == "b" and ia and not ib)):
                raise PalaceLocked(f"{live} (the plan writes into it; nothing written)", hint=live.hint)
        for t in TABLES:
            plan.delete_a[t] += erase["a"][t]
            plan.delete_b[t] += erase["b"][t]
        for side, live in (("a", live_a), ("b", live_b)):
            if live is not None and any(erase[side].values()):
                raise PalaceLocked(f"{live} (it holds rows a replica forgot; nothing written)", hint=live.hint)
        report = SyncReport(store_a.name, store_b.name, dry_run, plan.counts(), plan.conflicts,
                            forgotten={s: {t: len(v) for t, v in e.items() if v} for s, e in erase.items()},
                            rehashed={s.label: s.rehashed_because for s in (a, b) if s.rehashed_because},
                            went_back={k: v.went_back for k, v in (("a", saved_a), ("b", saved_b)) if v.went_back})
        if dry_run:
            report.seconds = round(time.monotonic() - started, 3)
            return report
        (final_a, marks_a), (final_b, marks_b) = (a.state, a.marks), (b.state, b.marks)
        if plan.moves():
            if ia and not ib:
                store_b.set_identity(ia)
            elif ib and not ia:
                store_a.set_identity(ib)
            report.moved = _apply(store_a, store_b, plan)
            final_a, marks_a, _ = store_a.changes(a.state, a.marks)  # re-reads what was written
            final_b, marks_b, _ = store_b.changes(b.state, b.marks)
        report.differences = _differences(final_a, final_b)
        report.converged = not report.differences
        if report.converged:
            for t, rows in tombs.items():  # a tombstone for a row both sides hold again is spent
                for i in [i for i in rows if i in final_a.get(t, {})]:
                    rows.pop(i)
            history = unforgotten(merged_history(a, b, final_a), forgotten)
            tombs = unforgotten(tombs, forgotten)
            kept = {t: sorted(v) for t, v in forgotten.items() if v}
            for store, saved, live in ((store_a, saved_a, live_a), (store_b, saved_b, live_b)):
                learned = set().union(*(v - set(saved.forgotten.get(t, ())) for t, v in forgotten.items()))
                if learned and live is None:  # its files (logs, free pages, older bundles) may hold them
                    report.scrubbed += store.scrub(forgotten) + forget_in_ledger(store.state_dir, forgotten)
            store_a.save_sync_state(SyncState(final_a, history, tombs, kept, marks_a))
            store_b.save_sync_state(SyncState(final_b, history, tombs, kept, marks_b))
        report.seconds = round(time.monotonic() - started, 3)
        return report
    finally:
        store_a.close()
        store_b.close()

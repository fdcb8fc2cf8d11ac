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

import time
from dataclasses import asdict, dataclass, field

from palace.clock import instant, now_utc, zone
from palace.errors import PalaceEtlError, VerificationFailed

from .embed import check_identity
from .replicas import TABLES, State, open_replica, replica_root, row_time

KEEP_BOTH_SUFFIX = "__conflict_"
HISTORY_KEEP = 32  # superseded versions remembered per row
History = dict[str, dict[str, list[str]]]


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


def local_deletions(known: State | None, current: State, tombstones: dict, now: str) -> dict:
    """(``now`` is UTC ISO; tombstones stored by older versions are naive local time of the sync host.)"""
    """Tombstones plus the ids this replica held at its last sync and no longer holds."""
    out = {t: dict(v) for t, v in tombstones.items()}
    for t, rows in (known or {}).items():
        for i in rows.keys() - current.get(t, {}).keys():
            out.setdefault(t, {}).setdefault(i, now)
    return out


def tombstone_time(when: str) -> float:
    t = instant(when, zone(None))
    return float("-inf") if t is None else t


def merge_tombstones(x: dict, y: dict) -> dict:
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


def merged_history(ha: History, hb: History, sa: State, sb: State, final: State) -> History:
    """After a sync both sides hold ``final``: every version either side saw, minus the one now held."""
    out: History = {}
    for t, rows in final.items():
        A, B, XA, XB = sa.get(t, {}), sb.get(t, {}), ha.get(t, {}), hb.get(t, {})
        for i, h in rows.items():
            seen = [v for v in _union(XA.get(i, []), XB.get(i, []), [A.get(i), B.get(i)]) if v and v != h]
            if seen:
                out.setdefault(t, {})[i] = seen[-HISTORY_KEEP:]
    return out


def _union(*lists: list) -> list:
    return list(dict.fromkeys(v for vs in lists for v in vs))


def plan_sync(a, b, sa: State, sb: State, ha: History, hb: History, tombs: dict, prefer: str | None,
              keep_both: bool) -> SyncPlan:
    """What moves where. ``ha``/``hb`` are the sides' histories, ``tombs`` the ids deleted anywhere
    (with when), merged from both sides."""
    plan = SyncPlan()
    undecided, revived = [], []
    for t in TABLES:
        A, B, T = sa.get(t, {}), sb.get(t, {}), tombs.get(t, {})
        XA, XB = ha.get(t, {}), hb.get(t, {})
        for i in sorted(A.keys() | B.keys()):
            va, vb = A.get(i), B.get(i)
            if va == vb:
                continue
            if va is None or vb is None:
                if i in T:
                    revived.append((t, i, "a" if vb is None else "b"))  # deleted somewhere: unless re-created since
                else:
                    (plan.to_a if va is None else plan.to_b)[t].append(i)
                continue
            a_saw_b, b_saw_a = vb in XA.get(i, ()), va in XB.get(i, ())
            if a_saw_b and not b_saw_a:
                plan.to_b[t].append(i)
            elif b_saw_a and not a_saw_b:
                plan.to_a[t].append(i)
            else:
                undecided.append((t, i, va, vb))
    _deletions(a, b, revived, tombs, plan, prefer)
    _resolve(a, b, undecided, plan, prefer, keep_both)
    return plan


def _deletions(a, b, items: list, tombs: dict, plan: SyncPlan, prefer: str | None) -> None:
    """A row one side holds and a replica deleted goes, unless it was written after the deletion
    (a re-creation) or ``--prefer`` names the side that holds it. Either way it is a listed conflict."""
    for t in TABLES:
        for side in ("a", "b"):
            ids = [i for tt, i, s in items if tt == t and s == side]
            if not ids:
                continue
            rows = _rows_by_id(a if side == "a" else b, t, ids)
            for i in ids:
                holder = a if side == "a" else b
                newer = i in rows and row_time(t, rows[i], holder.zone) > tombstone_time(tombs[t][i])
                if prefer == side or (prefer is None and newer):
                    tombs[t].pop(i)  # it lives, everywhere
                    (plan.to_b if side == "a" else plan.to_a)[t].append(i)
                    winner, rule = side, "prefer" if prefer else "written after the deletion"
                else:
                    (plan.delete_a if side == "a" else plan.delete_b)[t].append(i)
                    winner, rule = ("b" if side == "a" else "a"), "prefer" if prefer else "deletion wins"
                plan.conflicts.append({"table": t, "id": i, "winner": winner, "rule": rule})


def _rows_by_id(replica, table: str, ids: list[str]) -> dict[str, dict]:
    return {r["id"]: r for page in replica.fetch(table, ids) for r in page}


def _resolve(a, b, undecided: list, plan: SyncPlan, prefer: str | None, keep_both: bool) -> None:
    """Both sides changed the same id since the last sync: pick a winner per conflict."""
    for t in TABLES:
        items = [(i, ha, hb) for tt, i, ha, hb in undecided if tt == t]
        if not items:
            continue
        ra = _rows_by_id(a, t, [i for i, ha, _ in items if ha])
        rb = _rows_by_id(b, t, [i for i, _, hb in items if hb])
        for i, ha, hb in items:  # both sides hold the row, both changed it
            if prefer:
                winner, why = prefer, "prefer"
            elif t == "triples" and bool(ra[i].get("valid_to")) != bool(rb[i].get("valid_to")):
                winner, why = ("a" if ra[i].get("valid_to") else "b"), "invalidation beats open triple"
            else:
                ka, kb = (row_time(t, ra[i], a.zone), ha), (row_time(t, rb[i], b.zone), hb)
                winner, why = ("a" if ka > kb else "b"), "last writer wins"
            plan.conflicts.append({"table": t, "id": i, "winner": winner, "rule": why})
            (plan.to_b if winner == "a" else plan.to_a)[t].append(i)
            if keep_both and t in ("drawers", "closets"):
                plan.keep_both[t].append((i, "b" if winner == "a" else "a"))


def _apply(a, b, plan: SyncPlan) -> int:
    # capture the losing versions kept under new ids before the winners overwrite them (conflicts are few)
    kept: dict[str, list[dict]] = {}
    for t, items in plan.keep_both.items():
        for side, replica in (("a", a), ("b", b)):
            ids = [i for i, s in items if s == side]
            kept.setdefault(t, []).extend(dict(r, id=f"{r['id']}{KEEP_BOTH_SUFFIX}{side}")
                                          for page in replica.fetch(t, ids) for r in page)
    moved = 0
    for src, dst, ids, deletes in ((a, b, plan.to_b, plan.delete_b), (b, a, plan.to_a, plan.delete_a)):
        for t in TABLES:
            if deletes[t]:
                dst.apply(t, [], deletes[t])
                moved += len(deletes[t])
            for page in src.fetch(t, ids[t]):  # streamed: vectors travel a page at a time
                dst.apply(t, page, [])
                moved += len(page)
    for t, rows in kept.items():
        if rows:
            a.apply(t, rows, [])
            b.apply(t, rows, [])
            moved += 2 * len(rows)
    a.commit()
    b.commit()
    return moved


def _differences(sa: State, sb: State) -> dict:
    out = {}
    for t in TABLES:
        A, B = sa.get(t, {}), sb.get(t, {})
        diff = sorted(i for i in A.keys() | B.keys() if A.get(i) != B.get(i))
        if diff:
            out[t] = {"count": len(diff), "first": diff[:10]}
    return out


def run_sync(spec_a: str, spec_b: str, kg_a=None, kg_b=None, dry_run: bool = False, prefer: str | None = None,
             keep_both: bool = False, max_delete: int | None = None, lock_timeout: float = 30.0) -> SyncReport:
    started = time.monotonic()
    if replica_root(spec_a) == replica_root(spec_b):
        raise PalaceEtlError(f"sync {spec_a} {spec_b}: both name the same directory; give two different replicas")
    a, b = open_replica(spec_a, kg_a, lock_timeout), open_replica(spec_b, kg_b, lock_timeout)
    try:
        a.verified()
        b.verified()
        ia, ib = a.identity(), b.identity()
        if ia and ib:
            check_identity(ia, ib)  # vectors of another model never travel
        sa, sb = a.snapshot(), b.snapshot()
        ssa, ssb = a.sync_state(), b.sync_state()
        now = now_utc()
        tombs = merge_tombstones(local_deletions(ssa["known"], sa, ssa["tombstones"], now),
                                 local_deletions(ssb["known"], sb, ssb["tombstones"], now))
        ha, hb = local_history(ssa["known"], sa, ssa["history"]), local_history(ssb["known"], sb, ssb["history"])
        plan = plan_sync(a, b, sa, sb, ha, hb, tombs, prefer, keep_both)
        deletes = sum(len(plan.delete_a[t]) + len(plan.delete_b[t]) for t in ("drawers", "closets"))
        limit = max_delete if max_delete is not None else max(10, len(sa["drawers"]) // 20, len(sb["drawers"]) // 20)
        if deletes > limit:
            raise PalaceEtlError(f"sync {a.name} {b.name}: the plan deletes {deletes} drawers/closets, more than "
                                 f"--max-delete {limit}; nothing written",
                                 hint="check with --dry-run, then raise --max-delete if it is meant")
        report = SyncReport(a.name, b.name, dry_run, plan.counts(), plan.conflicts)
        if dry_run:
            report.seconds = round(time.monotonic() - started, 3)
            return report
        before_a, before_b = sa, sb
        if plan.moves():
            if ia and not ib:
                b.set_identity(ia)
            elif ib and not ia:
                a.set_identity(ib)
            report.moved = _apply(a, b, plan)
            sa, sb = a.snapshot(), b.snapshot()
        report.differences = _differences(sa, sb)
        report.converged = not report.differences
        if report.converged:
            for t, rows in tombs.items():  # a tombstone for a row both sides hold again is spent
                for i in [i for i in rows if i in sa.get(t, {})]:
                    rows.pop(i)
            history = merged_history(ha, hb, before_a, before_b, sa)
            a.save_sync_state(sa, history, tombs)
            b.save_sync_state(sb, history, tombs)
        report.seconds = round(time.monotonic() - started, 3)
        return report
    finally:
        a.close()
        b.close()

"""``palace-etl diff A B``: what changed from A to B -- two bundles (points of one chain, or the
newest of two bundle directories), two replicas, or a replica and a bundle. With B omitted, A is
one bundle and the diff runs from the bundle before it in its directory ("what the agents learned
since the last backup", for the nightly mail); the first bundle of a directory diffs from nothing.

Both snapshots (ids and row hashes) are compared first; only the rows that differ are fetched,
without vectors. From a bundle chain a row is read from the newest bundle that holds it, and only
the row groups holding wanted ids are read, so between two points of one chain the cost follows
the change (plus the two state files), not the palace.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from palace.bundles import list_bundles
from palace.crypt import Keys
from palace.errors import SourceMissing
from palace.rows import COLLECTIONS, KG_TABLES
from palace.stores import PalaceStore, bundle_point, open_store

PREVIEW = 160  # characters of an added or removed drawer's text shown
MAX_DIFF_WORDS = 5000  # per side: longer texts are reported as changed without a word diff
CONTEXT = 6  # unchanged words kept on each side of a change
TRIPLE_FIELDS = ("subject", "predicate", "object", "valid_from", "valid_to")


@dataclass
class DiffReport:
    a: str
    b: str
    drawers: dict = field(default_factory=dict)  # added / removed / edited: lists of items
    closets: dict = field(default_factory=dict)
    entities: dict = field(default_factory=dict)
    triples: dict = field(default_factory=dict)  # added / removed / invalidated / edited
    wings: dict = field(default_factory=dict)  # wing -> {added, removed, edited} drawer counts
    rooms: dict = field(default_factory=dict)  # "wing/room" -> the same counts
    seconds: float = 0.0

    @property
    def same(self) -> bool:
        return not any(items for part in (self.drawers, self.closets, self.entities, self.triples)
                       for items in part.values())

    def to_dict(self) -> dict:
        return asdict(self) | {"same": self.same, "counts": self.counts()}

    def counts(self) -> dict:
        return {name: {k: len(v) for k, v in part.items()} for name, part in
                (("drawers", self.drawers), ("closets", self.closets), ("entities", self.entities),
                 ("triples", self.triples))}


def word_diff(old: str, new: str) -> str | None:
    """``old`` -> ``new`` word by word, as ``git diff --word-diff=plain``: ``[-gone-]{+new+}``, long
    unchanged runs cut to their edges. None when a side is too long to diff in bounded time."""
    a, b = old.split(), new.split()
    if len(a) > MAX_DIFF_WORDS or len(b) > MAX_DIFF_WORDS:
        return None
    out: list[str] = []
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    if all(op[0] == "equal" for op in ops):
        return "(only whitespace changed)"
    for n, (op, i1, i2, j1, j2) in enumerate(ops):
        if op == "equal":
            words = a[i1:i2]
            head = words[:CONTEXT] if n else []
            tail = words[-CONTEXT:] if n < len(ops) - 1 else []
            if len(words) > len(head) + len(tail):
                out += [*head, "...", *tail] if (head or tail) else ["..."]
            else:
                out += words
            continue
        if i2 > i1:
            out.append("[-" + " ".join(a[i1:i2]) + "-]")
        if j2 > j1:
            out.append("{+" + " ".join(b[j1:j2]) + "+}")
    return " ".join(out)


def _fetch(store: PalaceStore, table: str, ids: set[str]) -> dict[str, dict]:
    if not ids:
        return {}
    return {r["id"]: r for page in store.fetch(table, sorted(ids), vectors=False) for r in page}


def _where(row: dict) -> tuple[str | None, str | None]:
    meta = row.get("metadata") or {}
    return meta.get("wing"), meta.get("room")


def _collection_diff(table: str, a: PalaceStore, b: PalaceStore, sa: dict, sb: dict, wings: dict,
                     rooms: dict) -> dict:
    added = set(sb) - set(sa)
    removed = set(sa) - set(sb)
    edited = {i for i in set(sa) & set(sb) if sa[i] != sb[i]}
    rows_a, rows_b = _fetch(a, table, removed | edited), _fetch(b, table, added | edited)

    def count(wing, room, what):
        if table == "drawers":
            wing = wing or "(no wing)"
            for counts, key in ((wings, wing), (rooms, f"{wing}/{room or '(no room)'}")):
                counts.setdefault(key, {"added": 0, "removed": 0, "edited": 0})[what] += 1

    def item(i: str, row: dict | None, what: str) -> dict:
        wing, room = _where(row or {})
        count(wing, room, what)
        text = (row or {}).get("document") or ""
        return {"id": i, "wing": wing, "room": room, "text": text[:PREVIEW] + ("..." if len(text) > PREVIEW else "")}

    out = {"added": [item(i, rows_b.get(i), "added") for i in sorted(added)],
           "removed": [item(i, rows_a.get(i), "removed") for i in sorted(removed)], "edited": []}
    for i in sorted(edited):
        old, new = rows_a.get(i), rows_b.get(i)
        if old is None or new is None:  # deleted by a writer between snapshot and fetch: not an edit
            continue
        wing, room = _where(new)
        count(wing, room, "edited")
        ma, mb = old.get("metadata") or {}, new.get("metadata") or {}
        meta = {k: {"a": ma.get(k), "b": mb.get(k)} for k in sorted(ma.keys() | mb.keys()) if ma.get(k) != mb.get(k)}
        texts_differ = (old.get("document") or "") != (new.get("document") or "")
        out["edited"].append({"id": i, "wing": wing, "room": room, "metadata": meta,
                              "text_diff": word_diff(old.get("document") or "", new.get("document") or "")
                              if texts_differ else ""})
    return out


def _triple(row: dict) -> dict:
    return {"id": row["id"], **{k: row.get(k) for k in TRIPLE_FIELDS}}


def _kg_diff(table: str, a: PalaceStore, b: PalaceStore, sa: dict, sb: dict) -> dict:
    added, removed = set(sb) - set(sa), set(sa) - set(sb)
    edited = {i for i in set(sa) & set(sb) if sa[i] != sb[i]}
    rows_a, rows_b = _fetch(a, table, removed | edited), _fetch(b, table, added | edited)
    if table == "entities":
        def show(r: dict) -> dict:
            return {"id": r["id"], "name": r.get("name"), "type": r.get("type")}

        return {"added": [show(rows_b[i]) for i in sorted(added) if i in rows_b],
                "removed": [show(rows_a[i]) for i in sorted(removed) if i in rows_a],
                "edited": [show(rows_b[i]) for i in sorted(edited) if i in rows_b and i in rows_a]}
    out = {"added": [_triple(rows_b[i]) for i in sorted(added) if i in rows_b],
           "removed": [_triple(rows_a[i]) for i in sorted(removed) if i in rows_a], "invalidated": [], "edited": []}
    for i in sorted(edited):
        old, new = rows_a.get(i), rows_b.get(i)
        if old is None or new is None:
            continue
        if old.get("valid_to") is None and new.get("valid_to") is not None:
            out["invalidated"].append(_triple(new))
        else:
            out["edited"].append(_triple(new) | {"changed": sorted(k for k in new if old.get(k) != new.get(k))})
    return out


def diff_stores(a: PalaceStore, b: PalaceStore) -> DiffReport:
    started = time.monotonic()
    sa, sb = a.snapshot(), b.snapshot()
    report = DiffReport(a.name, b.name)
    for table in COLLECTIONS:
        setattr(report, table, _collection_diff(table, a, b, sa.get(table, {}), sb.get(table, {}), report.wings,
                                                report.rooms))
    for table in KG_TABLES:
        setattr(report, table, _kg_diff(table, a, b, sa.get(table, {}), sb.get(table, {})))
    report.wings, report.rooms = dict(sorted(report.wings.items())), dict(sorted(report.rooms.items()))
    report.seconds = round(time.monotonic() - started, 3)
    return report


class _Nothing:
    """The side before a directory's first bundle: no rows (never fetched from: nothing differs in it)."""
    name = "(nothing: the first bundle)"

    def exists(self) -> bool:
        return True

    def verified(self, whole: bool = False) -> None:
        pass

    def snapshot(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def previous_bundle(spec: str) -> str | None:
    """The bundle before the bundle ``spec`` in its directory, None for the first."""
    point = bundle_point(Path(spec.removeprefix("bundle:")).expanduser())
    if point is None:
        raise SourceMissing(f"diff {spec}: with one argument, it must be one bundle (BACKUPS/palace-<time>-full|incr)")
    earlier = [b for b in list_bundles(point[0]) if b.name < point[1]]
    return str(earlier[-1]) if earlier else None


def run_diff(spec_a: str, spec_b: str | None = None, kg_a: Path | None = None, kg_b: Path | None = None,
             keys: Keys | None = None) -> DiffReport:
    """Open both sides read-only (lock-free beside a live MemPalace; ``keys`` open encrypted bundles).
    ``spec_b`` None: from the bundle before the bundle ``spec_a`` to it."""
    if spec_b is None:
        spec_a, spec_b = previous_bundle(spec_a), spec_a
    a = open_store(spec_a, kg_a, read_only=True, keys=keys) if spec_a is not None else _Nothing()
    try:
        b = open_store(spec_b, kg_b, read_only=True, keys=keys)
        try:
            for store in (a, b):
                if not store.exists():
                    raise SourceMissing(f"diff {store.name}: nothing there")
                store.verified(whole=False)  # a bundle chain is checked before a row of it is believed
            return diff_stores(a, b)
        finally:
            b.close()
    finally:
        a.close()

"""``RoutedStore``: a palace directory whose writer lease a live MemPalace hub or daemon holds,
written through it.

MemPalace 3.11 sanctions one way to write drawers beside its hub or daemon: its own tools (over the
hub's ``POST /mcp``, or as the daemon's ``mcp_tool`` jobs). ``mempalace_add_drawer`` files
``wing, room, content, source_file, added_by``; MemPalace makes the id (from wing, room and content), stamps ``filed_at`` now, embeds the text itself and splits text over
its ``chunk_size`` into chunk drawers. So this route cannot carry our ids, the rest of the metadata
or the vectors (``DROPPED``), and says so in the import report.

What it can keep is the mapping: ``routed.sqlite3`` in palace-etl's state directory records, per
drawer of ours, the drawer id and chunk ids MemPalace answered with and the metadata we meant to
write. ``fetch`` reads through that mapping, so the loader sees a routed drawer as itself (a re-run
writes nothing) and ``verify --against`` finds it. A drawer whose content changed is filed anew and
its old hub drawer deleted (``mempalace_delete_drawers``), after the new one is acknowledged -- but
only a hub drawer this route filed (its ``filed`` table). Where MemPalace already held the same wing,
room and text, it answers ``already_exists`` with that drawer, which may be the user's own: it is
mapped, never deleted, and the report says where one was kept.

Reads (``rows``, ``snapshot``, ``fetch`` of what is already there, ``nearest``) come from a private
copy (``ChromaDirReader``), never from a Chroma client on the live directory. Knowledge-graph rows go
straight to ``knowledge_graph.sqlite3`` (MemPalace exempts its KG tools from the lease too). Nothing
here takes the palace lock.
"""
from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path
from typing import Iterator

import orjson

from ..chroma_sqlite import (
    journal_is_hot,
    palace_db,
    quick_check,
    ro_uri,
    roll_back_journal,
    vacuum,
)
from ..errors import PalaceEtlError
from ..identity import EmbedderIdentity
from ..ids import content_sha256
from ..kg import KnowledgeGraph
from ..layout import ROUTED_FILE, PalaceLayout, open_private, private_dir
from ..live import Daemon, DaemonClient, Hub, HubClient, HubError, HubRefused
from ..rows import KG_TABLES
from .base import scan_by_fetch
from .chroma_dir import ChromaDirReader, ChromaDirStore

ADDED_BY = "palace-etl"  # what a routed drawer is filed as added by, where its record names no one
DROPPED = ("our drawer ids (the hub makes its own; routed.sqlite3 maps them)",
           "metadata beyond wing, room, source_file and added_by", "original filed_at", "carried vectors")
_SQL = """CREATE TABLE IF NOT EXISTS routed (
    id TEXT PRIMARY KEY, hub_id TEXT NOT NULL, chunk_ids TEXT NOT NULL, metadata TEXT NOT NULL)"""
CHUNK_PROBE = 256  # chunk ids looked up at a time
_FILED = "CREATE TABLE IF NOT EXISTS filed (hub_id TEXT PRIMARY KEY)"  # the hub drawers this route filed itself


class RoutedIds:
    """Our drawer id -> (the hub's drawer id, its chunk ids, the metadata we meant)."""

    def __init__(self, state_dir: Path, read_only: bool = False):
        path = state_dir / ROUTED_FILE
        if read_only:
            self._conn = sqlite3.connect(ro_uri(path), uri=True, timeout=60, isolation_level=None)
            return
        private_dir(state_dir)
        open_private(path).close()
        self._conn = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(_SQL)
        self.recorded = self._conn.execute(  # False in a file from before filings were recorded
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'filed'").fetchone() is not None

    @classmethod
    def read(cls, state_dir: Path | None) -> dict[str, tuple[str, list[str], dict]]:
        """The whole mapping of a state directory (empty when nothing was ever routed)."""
        if state_dir is None or not (state_dir / ROUTED_FILE).is_file():
            return {}
        routed = cls(state_dir, read_only=True)
        try:
            return routed.get(None)
        finally:
            routed.close()

    def get(self, ids: list[str] | None) -> dict[str, tuple[str, list[str], dict]]:
        if ids is None:
            rows = self._conn.execute("SELECT * FROM routed").fetchall()
        else:
            rows = []
            for s in range(0, len(ids), 900):
                part = ids[s:s + 900]
                rows += self._conn.execute(f"SELECT * FROM routed WHERE id IN ({','.join('?' * len(part))})",
                                           part).fetchall()
        return {i: (h, orjson.loads(c), orjson.loads(m)) for i, h, c, m in rows}

    def shared(self, hub_id: str) -> int:
        """How many of our drawers map to ``hub_id`` (two records with the same text share one)."""
        return self._conn.execute("SELECT count(*) FROM routed WHERE hub_id = ?", (hub_id,)).fetchone()[0]

    def put(self, our_id: str, hub_id: str, chunk_ids: list[str], metadata: dict) -> None:
        self._conn.execute("INSERT OR REPLACE INTO routed VALUES (?,?,?,?)",
                           (our_id, hub_id, orjson.dumps(chunk_ids).decode(), orjson.dumps(metadata).decode()))

    def record(self, filed: set[str]) -> None:
        """Start recording filings, in a file from before they were: ``filed`` is what the mapping
        already held that this route can tell it filed (see ``RoutedStore._map``)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(_FILED)
            self._conn.executemany("INSERT OR IGNORE INTO filed VALUES (?)", [(h,) for h in filed])
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self.recorded = True

    def filed(self, hub_id: str) -> bool:
        """Whether this route filed ``hub_id``."""
        return self._conn.execute("SELECT 1 FROM filed WHERE hub_id = ?", (hub_id,)).fetchone() is not None

    def mark(self, hub_id: str, filed: bool) -> None:
        """Record that this route filed ``hub_id`` (or, once deleted, that it holds it no more)."""
        self._conn.execute("INSERT OR IGNORE INTO filed VALUES (?)" if filed else
                           "DELETE FROM filed WHERE hub_id = ?", (hub_id,))

    def forget(self, ids: set[str]) -> int:
        """Drop the entries of ``ids`` (ours or the hub's) and leave none of them in the file."""
        gone = 0
        part_ids = sorted(ids)
        for s in range(0, len(part_ids), 400):
            part = part_ids[s:s + 400]
            marks = ",".join("?" * len(part))
            gone += self._conn.execute(f"DELETE FROM routed WHERE id IN ({marks}) OR hub_id IN ({marks})",
                                       [*part, *part]).rowcount
            if self.recorded:
                gone += self._conn.execute(f"DELETE FROM filed WHERE hub_id IN ({marks})", part).rowcount
        if gone:
            vacuum(self._conn)
        return gone

    def close(self) -> None:
        self._conn.close()


class RoutedStore:
    """Writes drawers through a live hub or daemon (``server``); see the module docstring."""

    kind = "chroma"
    dropped = DROPPED

    def __init__(self, layout: PalaceLayout, server: Hub | Daemon, lock_timeout: float = 30.0):
        self.server = server
        self.route = server.kind
        self._live = ChromaDirStore(layout, lock_timeout)
        self._reader = ChromaDirReader(layout, lock_timeout)
        self._client = HubClient(server) if server.kind == "hub" else DaemonClient(server)
        self._routed: RoutedIds | None = None
        self._own: set[str] = set()  # our ids found under themselves (imported before, directly)
        self.refused: list[tuple[str, str]] = []  # (our id, MemPalace's reason) of drawers it would not file
        self.recovered: list[str] = []  # what was put right, or kept, on the way (``_put_right``, ``_drop``)
        self.name, self.zone, self.kg_path = self._live.name, self._live.zone, self._live.kg_path
        self.state_dir, self.root = self._live.state_dir, self._live.root

    def __repr__(self) -> str:
        return f"RoutedStore({self.name!r} via {self.server.url})"

    def _map(self) -> RoutedIds:
        if self._routed is None:
            self._routed = RoutedIds(self.state_dir)
            if not self._routed.recorded:
                self._routed.record(self._ours(self._routed.get(None)))
        return self._routed

    def _ours(self, mapped: dict[str, tuple[str, list[str], dict]]) -> set[str]:
        """The hub drawers of a mapping from before filings were recorded that carry what this route
        sent besides the text (``added_by`` and ``source_file``): those it filed. A drawer the user
        filed with the same text shows their own (MemPalace's tools file ``added_by="mcp"``)."""
        first = {chunks[0]: (hub, meta) for hub, chunks, meta in mapped.values()}
        ours: set[str] = set()
        if not first:
            return ours
        for page in self._reader.fetch("drawers", list(first), vectors=False):
            for row in page:
                hub, meta = first[row["id"]]
                held = row["metadata"] or {}
                if (held.get("added_by"), held.get("source_file") or "") == \
                        (meta.get("added_by") or ADDED_BY, meta.get("source_file") or ""):
                    ours.add(hub)
        return ours

    # ------------------------------------------------------------------ reads
    def exists(self) -> bool:
        return self._live.exists()

    def verified(self, whole: bool = True) -> None:
        self._live.verified()

    def sync_state(self):
        return self._live.sync_state()

    def snapshot(self):
        return self._reader.snapshot()

    def changes(self, known, marks):
        return self._reader.changes(known, marks)

    def marks(self):
        return self._reader.marks()

    def read_view(self, rows):
        return self  # reads through this store's fetch: routed drawers under our ids

    def prepare(self, changes=False):
        self._reader.prepare()  # not changes: this store's fetch reads hub drawers by their own ids

    def scan(self, table):
        return scan_by_fetch(self, table)  # through this store's fetch: routed drawers under our ids

    def rows(self, table, fields=None):
        return self._reader.rows(table, fields)

    def info(self, table):
        return self._reader.info(table)

    def counts(self):
        return self._reader.counts()

    def nearest(self, table, vectors, k):
        return self._reader.nearest(table, vectors, k)

    def integrity(self, full: bool):
        return self._reader.integrity(full)

    def fetch(self, table: str, ids: list[str], vectors: bool = True) -> Iterator[list[dict]]:
        """Rows of ``ids`` as the loader and verify know them: a routed drawer under our id, with the
        metadata we meant, while the hub's copy still holds the text we sent."""
        if table != "drawers":
            yield from self._reader.fetch(table, ids, vectors)
            return
        mapped = self._map().get(ids)
        wanted = [i for i in ids if i not in mapped] + [c for _, chunks, _ in mapped.values() for c in chunks]
        held = {r["id"]: r for page in self._reader.fetch(table, wanted, vectors=False) for r in page}
        out = []
        for i in ids:
            if i in mapped:
                _, chunks, meta = mapped[i]
                if all(c in held for c in chunks):
                    text = "".join(held[c]["document"] or "" for c in chunks)
                    if content_sha256(text) == meta.get("content_sha256"):
                        out.append({"id": i, "document": text, "metadata": meta})
            elif i in held:
                self._own.add(i)
                out.append(held[i])
        yield out

    # ----------------------------------------------------------------- writes
    def write(self, table: str, rows: list[dict]) -> None:
        if table in KG_TABLES:
            self._live.write(table, rows)
            return
        if table != "drawers":
            raise PalaceEtlError(f"write {table} into {self.name}: {self.server} files drawers only",
                                 hint="stop it for the migration window (--wait), or serve the palace from PostgreSQL")
        routed = self._map()
        before = routed.get([r["id"] for r in rows])
        calls = []
        for row in rows:
            meta = row["metadata"]
            args = {"wing": meta["wing"], "room": meta["room"], "content": row["document"],
                    "added_by": meta.get("added_by") or ADDED_BY}
            if meta.get("source_file"):
                args["source_file"] = meta["source_file"]
            calls.append(args)
        for row, answer in zip(rows, self._calls("mempalace_add_drawer", calls)):
            if not answer.get("success"):
                self.refused.append((row["id"], str(answer.get("error") or answer)))
                continue
            hub_id, chunks = answer["drawer_id"], answer.get("chunk_ids")
            if answer.get("reason") == "already_exists":  # held before: the user's, or ours unrecorded
                chunks = self._chunks(hub_id)
            else:
                routed.mark(hub_id, True)
            old = before[row["id"]][0] if row["id"] in before else (row["id"] if row["id"] in self._own else None)
            if old is not None and old != hub_id and routed.shared(old) == (row["id"] in before):
                self._drop(old, row["id"])  # the text changed: its old drawer goes, once the new one is filed
            routed.put(row["id"], hub_id, chunks or [hub_id], row["metadata"])

    def _chunks(self, hub_id: str) -> list[str] | None:
        """The chunk ids of a drawer MemPalace already held (its "already_exists" names none), from the
        private copy: MemPalace numbers a drawer's chunks from 0 without a gap. (Not by asking:
        MemPalace's daemon runs no read tool.) None when the copy does not hold it."""
        if self._held([hub_id]):
            return [hub_id]
        found: list[str] = []
        while True:
            want = [f"{hub_id}_chunk_{i:06d}" for i in range(len(found), len(found) + CHUNK_PROBE)]
            held = self._held(want)
            run = list(itertools.takewhile(held.__contains__, want))
            found += run
            if len(run) < len(want):
                return found or None

    def _held(self, ids: list[str]) -> set[str]:
        return {r["id"] for page in self._reader.fetch("drawers", ids, vectors=False) for r in page}

    def _drop(self, drawer_id: str, our_id: str) -> None:
        """Delete a drawer this route filed and replaced. Before the mapping moves on, so a crash in
        between leaves the old id mapped and the re-run deletes it (a missing id is no error). One it
        did not file (our direct import's excepted) is kept, and said so."""
        if drawer_id != our_id and not self._map().filed(drawer_id):
            self.recovered.append(f"kept {drawer_id}, the drawer the old text of {our_id} was mapped to: "
                                  "palace-etl did not file it (MemPalace held the same text already)")
            return
        answer = next(self._calls("mempalace_delete_drawers", [{"drawer_ids": [drawer_id]}]))
        if "results" not in answer:
            raise HubError(f"{self.server}: deleting the replaced drawer {drawer_id} failed: "
                           f"{answer.get('error', answer)}")
        self._map().mark(drawer_id, False)

    def _calls(self, tool: str, arguments: list[dict]) -> Iterator[dict]:
        """The server's answers, one per call; a refusal ``_put_right`` can put right is, once, and the
        calls not yet answered are sent again."""
        done, retried = 0, False
        while True:
            try:
                for answer in self._client.calls(tool, arguments[done:]):
                    done += 1
                    yield answer
                return
            except HubRefused as exc:
                if retried or not self._put_right(exc):
                    raise
                retried = True

    def _put_right(self, exc: HubRefused) -> bool:
        """MemPalace 3.11's integrity gate reads chroma.sqlite3 through a read-only connection, which
        cannot roll back the journal a writer killed mid-transaction leaves (SQLITE_READONLY_ROLLBACK:
        "attempt to write a readonly database"). It takes that for corruption and refuses every write
        until the palace is "repaired", while the data is intact: SQLite rolls such a journal back on
        the next read-write open, which nothing in a refusing hub ever makes. So: that open here (of
        our palace's file, not the path the server names), our own quick_check, then
        ``mempalace_reconnect`` to re-run the gate. Any other finding is the server's to report."""
        errors = exc.integrity_errors()
        db = palace_db(self.root)
        if not errors or not all("readonly database" in e for e in errors) or not journal_is_hot(db):
            return False
        roll_back_journal(db)
        problems = quick_check(db)
        if problems:
            raise HubError(f"{db}: rolled back an interrupted write's journal, then PRAGMA quick_check found: "
                           + "; ".join(problems[:3]), hint="nothing else was changed; back the palace up "
                           "before any repair (palace-etl export), then see `mempalace repair --help`") from exc
        answer = self._client.call("mempalace_reconnect", {})
        if answer.get("success") is False:
            raise HubError(f"{self.server}: mempalace_reconnect after rolling back {db}'s journal: "
                           f"{answer.get('message') or answer}") from exc
        self.recovered.append(f"{self.server} refused writes (its integrity check could not read {db} past "
                              "the journal of a write interrupted mid-transaction); the journal was rolled "
                              "back, quick_check is ok, and the hub reconnected")
        return True

    def delete(self, table: str, ids: list[str]) -> None:
        if table in KG_TABLES:
            self._live.delete(table, ids)
            return
        raise PalaceEtlError(f"delete from {self.name}: the {self.route} route does not delete drawers "
                             "palace-etl did not write through it", hint="stop it for the window, or use --wait")

    def commit(self) -> None:
        pass  # every acknowledged call is durable in MemPalace; the mapping commits per row

    def batch_limit(self, table: str) -> int:
        return 500

    # ------------------------------------------------------- identity, KG, state
    def identity(self) -> EmbedderIdentity | None:
        return self._live.identity()

    def claim_identity(self, ident: EmbedderIdentity) -> None:
        pass  # MemPalace embeds every text with the palace's own model (and creates the palace if need be)

    def sidecar(self) -> bytes | None:
        return self._live.sidecar()

    def knowledge_graph(self, read_only: bool = False) -> KnowledgeGraph:
        return KnowledgeGraph(self.kg_path, read_only=read_only)

    def session(self, exclusive: bool, timeout: float):
        return self._live.session(exclusive, timeout)

    def is_empty(self) -> bool:
        return self._reader.is_empty()

    def _refuse(self, *args, **kwargs):
        raise PalaceEtlError(f"write {self.name}: {self.server} holds it; only drawers and KG rows go through")

    set_identity = put_sidecar = replacing = check_target = save_sync_state = scrub = _refuse

    def close(self) -> None:
        self._reader.close()
        self._live.close()
        self._client.close()
        if self._routed is not None:
            self._routed.close()
            self._routed = None

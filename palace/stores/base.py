"""``PalaceStore``: the one interface every verb reads and writes a palace through.

A store holds the four tables of ``palace.rows`` (drawers and closets with their vectors, KG
entities and triples), the embedder identity with its sidecar, and the per-peer sync state. Every
implementation passes ``tests/test_store_contract.py``; a new backend is one module here plus a
green contract suite.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol

import numpy as np
import orjson

from ..identity import EmbedderIdentity
from ..kg import KnowledgeGraph
from ..layout import atomic_write
from ..rows import State

READ_PAGE = 1000  # rows per read transaction: a long read never blocks writers for longer than a page
Page = list[tuple[str, "str | None", dict]]  # (id, document, metadata) rows of a collection

ASIDE = ".before-restore-"  # <name><ASIDE><stamp>: what a restore --force replaced, kept beside it


@dataclass(frozen=True)
class CollectionInfo:
    count: int
    dimension: int | None
    settings: dict  # collection metadata (hnsw:*), what a restore re-creates
    log: dict | None = None  # the vector index against SQLite's bookkeeping, where the store can tell


@dataclass
class SyncState:
    """What a replica remembers between syncs with its peers."""

    known: State | None  # what it held at the end of its last sync
    history: dict  # {table: {id: [superseded row hashes]}}
    tombstones: dict  # {table: {id: when deleted}}
    forgotten: dict = field(default_factory=dict)  # {table: [ids]} erased by forget: never copied back
    marks: dict | None = None  # the store's change marks ``known`` was taken with (``PalaceStore.changes``)
    position: str | None = None  # which content ``known`` describes, where the store can name it (its own to save)
    went_back: str | None = None  # why ``known`` was set aside: the replica is older than it (not saved)


class PalaceStore(Protocol):
    name: str  # how reports and errors name it
    zone: dt.tzinfo  # the zone its naive drawer stamps are in
    kg_path: Path | None  # the knowledge-graph file, for a store that has one
    state_dir: Path | None  # palace-etl's own bookkeeping (ledger, quarantine), for a store that has it
    root: Path | None  # the local directory it occupies (None for a server)
    route: str  # "direct": rows land as given (ids, metadata, vectors); "hub": through MemPalace's own tools
    dropped: tuple[str, ...]  # what its route cannot carry (nothing, for a direct one)
    refused: list[tuple[str, str]]  # (id, reason) of rows written that it would not take
    recovered: list[str]  # what its route found wrong on the way and put right (said in reports)

    def exists(self) -> bool:
        """Whether it holds a palace yet (a new directory does not)."""

    def verified(self, whole: bool = True) -> None:
        """Raise when it cannot be trusted as it stands (a bundle chain that does not verify); with
        ``whole``, also when it holds only part of a palace (a one-wing bundle), as a sync replica must not."""

    def snapshot(self) -> State:
        """{table: {id: row hash}} of every table, in the store's own order; no vectors read."""

    def read_view(self, rows: int) -> "PalaceStore":
        """Where to ``fetch`` ``rows`` rows from to write them elsewhere: a consistent private copy of
        this store taken now, where that is cheaper than its own reads (closed with it); else itself."""

    def prepare(self, changes: bool = False) -> None:
        """Take now what its first read would take first (a private copy, an index's id map), so that
        can overlap other work: called from another thread while nothing else uses the store. Only a
        head start: a store that skips it, or fails in it, reads the same (and fails again there).
        ``changes``: the caller's first read is ``changes``, and it then fetches only rows that
        changed (an incremental export); a store may read just those, beside live writers."""

    def changes(self, known: State, marks: dict | None) -> tuple[State, dict | None, str | None]:
        """``snapshot()``, re-hashing only what changed since ``known`` was taken with ``marks`` (this
        store's change marks of then, from an earlier call): (the state, the marks of now for the next
        call or None where the store has none, why every row was re-hashed or None)."""

    def marks(self) -> dict | None:
        """The store's change marks of now, as ``changes`` returns them; None where it keeps none."""

    def scan(self, table: str) -> Iterator[list[dict]]:
        """Pages of every row of a table, as ``fetch`` gives them (vectors included), in the store's own
        order; in one read of each row where the store can."""

    def rows(self, table: str, fields: tuple[str, ...] | None = None) -> Iterator[Page]:
        """Pages of a collection's ``(id, document, metadata)``, no vectors. With ``fields`` only those
        metadata keys are read, and the document only when ``"document"`` is among them. A KG table
        gives ``(id, None, {column: value})``."""

    def fetch(self, table: str, ids: list[str], vectors: bool = True) -> Iterator[list[dict]]:
        """Pages of full rows of ``ids`` (``{id, document, metadata, embedding}`` for a collection,
        ``{column: value}`` for a KG table). An id the store does not hold is simply absent."""

    def info(self, table: str) -> CollectionInfo | None:
        """Size, vector dimension and settings of a collection; None when it does not exist."""

    def counts(self) -> dict[str, int]:
        """Rows per table."""

    def nearest(self, table: str, vectors: np.ndarray, k: int) -> list[tuple[list[str], list[float]]]:
        """For each query vector, the ``k`` nearest ids with their cosine distances (a damaged index
        answers ``([], [])`` for the queries it fails on)."""

    def write(self, table: str, rows: list[dict]) -> None:
        """Insert or replace rows, chunked by the store's own batch limit."""

    def delete(self, table: str, ids: list[str]) -> None:
        """Remove rows by id (ids it does not hold are ignored)."""

    def commit(self) -> None:
        """Make the writes since the last commit durable and visible (a bundle store writes its bundle)."""

    def scrub(self, forgotten: dict[str, set[str]]) -> list[str]:
        """After ``forgotten`` rows ({table: their ``id_key`` hashes}) were deleted (and committed):
        leave nothing of them recoverable from the store's files (logs, free pages, older bundles).
        Returns what was done, per file."""

    def identity(self) -> EmbedderIdentity | None:
        """The embedder its vectors were made with, as recorded."""

    def set_identity(self, ident: EmbedderIdentity) -> None:
        """Record ``ident`` (the sidecar MemPalace reads)."""

    def claim_identity(self, ident: EmbedderIdentity) -> None:
        """Refuse (``EmbedderMismatch``) when another embedder is recorded; record ``ident`` when the
        store records none and holds no drawers yet. Creates the palace when it does not exist."""

    def sidecar(self) -> bytes | None:
        """The embedder sidecar's bytes, as MemPalace wrote them."""

    def put_sidecar(self, data: bytes) -> None:
        ...

    def knowledge_graph(self, read_only: bool = False) -> KnowledgeGraph:
        """The knowledge graph, opened for writing or read-only (the caller closes it)."""

    def session(self, exclusive: bool, timeout: float) -> ContextManager:
        """Held for a whole run: shared by imports, exclusive by a restore replacing the palace."""

    def is_empty(self) -> bool:
        """Holds no palace at all (no collections, no knowledge graph)."""

    def check_target(self) -> None:
        """Refuse, before anything is built, a target a restore must not replace."""

    def replacing(self, force: bool, timeout: float, check: Callable[["PalaceStore"], None],
                  settings: dict | None = None) -> ContextManager:
        """A whole new palace in place of this one: ``with ... as swap`` yields ``swap.target`` to write
        into; ``check(target)`` runs before the new palace takes this one's place, and ``swap.replaced``
        names where an old palace was kept aside."""

    def kept_aside(self) -> list[str]:
        """What a restore with ``--force`` kept aside of this palace (directories, tables, files), by
        the names it gave them; [] when none."""

    def integrity(self, full: bool) -> list[tuple[Path | str, list[str] | None]]:
        """SQLite integrity problems per file ([] when sound, None when it cannot be checked here),
        the KG file among them."""

    def sync_state(self) -> SyncState:
        ...

    def save_sync_state(self, state: SyncState) -> None:
        ...

    def close(self) -> None:
        ...


class SyncStateFile:
    """The sync state kept as one JSON file (``_sync_file``), written atomically; and the route of a
    store that writes rows as given."""

    _sync_file: Path
    route = "direct"
    dropped: tuple[str, ...] = ()
    refused: tuple = ()  # a direct store takes every row or raises
    recovered: tuple = ()

    def changes(self, known, marks):
        return self.snapshot(), None, f"{type(self).__name__} keeps no change marks"

    def read_view(self, rows):
        return self

    def kept_aside(self):
        return []

    def prepare(self, changes=False):
        pass

    def marks(self):
        return None

    def scan(self, table):
        return scan_by_fetch(self, table)

    def sync_state(self) -> SyncState:
        try:
            data = orjson.loads(self._sync_file.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        position = data.get("position")
        saved = SyncState(data.get("known"), data.get("history", {}), data.get("tombstones", {}),
                          data.get("forgotten", {}), data.get("marks"), position if isinstance(position, str) else None)
        why = None
        if saved.known is not None:
            why = (self._went_back(saved.position) if saved.position else None) or \
                self._recent_rows_gone(data.get("newest", data.get("kg_position")))
        # older than at its last sync (a newer state removed, or put back from a copy): the rows written
        # since are missing, not deleted, and a sync must not delete them elsewhere
        return replace(saved, known=None, marks=None,
                       went_back=f"{why}: rows missing since are not taken for deleted") if why else saved

    def save_sync_state(self, state: SyncState) -> None:
        atomic_write(self._sync_file, orjson.dumps({"known": state.known, "history": state.history,
                                                    "tombstones": state.tombstones, "forgotten": state.forgotten,
                                                    "marks": state.marks, "position": self._position(),
                                                    "newest": self._recent_rows(state.forgotten)}))

    def _position(self) -> str | None:
        """Which content the store holds now, where it can name it (saved as ``SyncState.position``)."""
        return None

    def _went_back(self, held: str) -> str | None:
        """Why the store now holds older content than at ``held`` (a ``_position`` of then), or None."""
        return None

    def _recent_rows(self, forgotten: dict) -> dict | None:
        """Its newest rows per table, where the store can name them, naming no row in ``forgotten``
        ({table: their ``id_key`` hashes}): saved beside ``known``, so a copy put back from before
        they were written is told apart from rows deleted since."""
        return None

    def _recent_rows_gone(self, held) -> str | None:
        """Why the store now holds older content than when ``held`` (a ``_recent_rows``) was its newest
        rows, or None."""
        return None


def scan_by_fetch(store: PalaceStore, table: str) -> Iterator[list[dict]]:
    """``scan`` for a store that reads whole rows only by id: each page of ``rows``, fetched."""
    for page in store.rows(table):
        yield from store.fetch(table, [i for i, _, _ in page])


def no_session(exclusive: bool = False, timeout: float = 0.0) -> ContextManager:
    return contextlib.nullcontext()

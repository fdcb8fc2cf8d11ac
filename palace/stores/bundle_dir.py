"""A directory of bundles (on a shared disk) as a sync replica.

It reads the newest bundle's chain (of the bundles its syncs wrote: an export into the same
directory is not the replica's state, see ``replica_line``): the snapshot is its
``state.parquet``, a row is read from the newest bundle in the chain that holds it. Writes are
staged and ``commit`` writes them as one new bundle chained to the newest (full when there is
none), through the one bundle writer. Nothing is read from a chain that does not verify.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import pyarrow.parquet as pq

from ..bundles import (
    REPLICA_OWNER,
    BundleContent,
    bundle_dir_lock,
    bundle_state,
    chain,
    list_bundles,
    readable,
    replica_line,
    rewrite_without,
    verify_chain,
    write_bundle,
)
from ..clock import recorded_zone
from ..crypt import CryptError, Keys, Sealer
from ..errors import PalaceEtlError
from ..identity import EmbedderIdentity, check_identity
from ..kg import KnowledgeGraph
from ..layout import CLOSETS_COLLECTION, DRAWERS_COLLECTION, HNSW_METADATA, SIDECAR
from ..manifest import NAME_RE, BundleError, Manifest, bundle_time
from ..rows import (
    COLLECTIONS,
    KG_TABLES,
    TABLES,
    State,
    paged,
    records_batch,
    rows_of_batch,
    table_row_hash,
)
from .base import CollectionInfo, Page, SyncStateFile

FETCH_PAGE = 5000


class BundleDirStore(SyncStateFile):
    kind = "bundle"
    kg_path = None
    state_dir = None

    def __init__(self, out: Path, keys: Keys | None = None, at: str | None = None):
        self.out = Path(out)
        self.keys = keys
        self.at = at  # one bundle of the directory (a point of its chain), read-only
        self._open: tuple[str, Path, contextlib.ExitStack] | None = None  # the newest bundle, readable
        self._line: tuple[tuple[str, ...], Path | None] | None = None  # (the listing, its newest replica bundle)
        self.root = self.out
        self.name = f"bundle:{self.out.resolve()}" + (f"/{at}" if at else "")
        self.zone = recorded_zone(None)
        self._sync_file = self.out / ".sync-state.json"
        self._rows: dict[str, dict[str, dict]] = {t: {} for t in TABLES}
        self._deletes: dict[str, set[str]] = {t: set() for t in TABLES}
        self._identity: EmbedderIdentity | None = None
        self.unscrubbed: list[dict] = []  # the bundles the last ``scrub`` could not open: {bundle, why}

    def __repr__(self) -> str:
        return f"BundleDirStore({str(self.out)!r})"

    def _newest(self) -> Path | None:
        """The newest bundle of the replica's own line (``replica_line``: an export written into the
        directory is not the replica's state), or the one bundle named with ``at``."""
        bundles = list_bundles(self.out)
        if self.at is not None:
            point = [b for b in bundles if b.name == self.at]
            if not point:
                raise BundleError(f"read bundle {self.out / self.at}: no such bundle")
            return point[0]
        names = tuple(b.name for b in bundles)
        if self._line is None or self._line[0] != names:
            line = replica_line(bundles)
            self._line = (names, line[-1] if line else None)
        return self._line[1]

    def _latest(self) -> Path | None:
        """The newest bundle in plaintext: itself, or its chain decrypted into a private temp copy
        (kept until ``close`` or the next commit)."""
        newest = self._newest()
        if newest is None:
            return None
        if self._open is None or self._open[0] != newest.name:
            self._forget()
            stack = contextlib.ExitStack()
            try:
                plain = stack.enter_context(readable(newest, self.keys))
            except BaseException:
                stack.close()
                raise
            self._open = (newest.name, plain, stack)
        return self._open[1]

    def _forget(self) -> None:
        if self._open is not None:
            self._open[2].close()
            self._open = None

    def _manifest(self) -> Manifest | None:
        latest = self._latest()
        return Manifest.load(latest) if latest else None

    def exists(self) -> bool:
        return self._newest() is not None

    def verified(self, whole: bool = True) -> None:
        """Refuse a damaged chain before anything is planned from it: a state file short of rows
        would otherwise make sync delete those drawers everywhere. A bundle of one wing is refused
        too: as a replica it would look like a palace that lost every other wing."""
        newest = self._newest()
        if newest is None:
            return
        problems = verify_chain(newest)
        if problems:
            raise BundleError(f"sync replica {self.name}: the newest bundle does not verify, nothing "
                              f"written: {problems[0]}", hint=f"palace-etl verify --bundle {newest}")
        m = self._manifest()  # an encrypted chain is decrypted and checked here
        if whole and m is not None and m.wing is not None:
            raise BundleError(f"sync replica {self.name}: its newest bundle holds only wing {m.wing}; a sync would "
                              "take every other wing for deleted", hint=f"restore it instead: palace-etl restore "
                              f"{newest} --palace NEW_DIR")

    # ----------------------------------------------------------------- reading
    def _position(self) -> str | None:
        newest = self._newest()
        return newest.name if newest else None

    def _went_back(self, held: str) -> str | None:
        if not NAME_RE.fullmatch(held):
            return None
        newest = self._newest()
        if newest is not None and bundle_time(newest.name) >= bundle_time(held):
            return None
        now = f"its newest bundle is {newest.name}" if newest else "it holds no bundle"
        return f"{now}, older than {held}, which it held at its last sync"

    def snapshot(self) -> State:
        latest = self._latest()
        return {t: {} for t in TABLES} | (bundle_state(latest) if latest else {})

    def _newest_rows(self, table: str, wanted: set[str] | None, vectors: bool = True) -> Iterator[dict]:
        """Each wanted row (all rows when None) from the newest bundle of the chain holding it. For
        wanted rows, only the ids of each row group are read until one holds a wanted row, so the
        cost follows the rows asked for (and no vector is read when ``vectors`` is False)."""
        latest = self._latest()
        if latest is None:
            return
        live = bundle_state(latest).get(table, {})
        every = wanted is None
        wanted = set(live) if every else wanted & set(live)
        for link in reversed(chain(latest)):
            path = link / f"{table}.parquet"
            if not wanted:
                return
            if not path.exists():
                continue
            pf = pq.ParquetFile(path)
            columns = [c for c in pf.schema_arrow.names if vectors or c != "embedding"]
            for g in range(pf.metadata.num_row_groups):
                if every:
                    batch = pf.read_row_group(g, columns=columns)
                    keep = [k for k, i in enumerate(batch.column("id").to_pylist()) if i in wanted]
                else:
                    ids = pf.read_row_group(g, columns=["id"]).column("id").to_pylist()
                    keep = [k for k, i in enumerate(ids) if i in wanted]
                    if not keep:
                        continue
                    batch = pf.read_row_group(g, columns=columns)
                if not keep:
                    continue
                for b in batch.take(keep).combine_chunks().to_batches():
                    for r in rows_of_batch(b) if table in COLLECTIONS else b.to_pylist():
                        wanted.discard(r["id"])
                        yield r

    def rows(self, table: str, fields: tuple[str, ...] | None = None) -> Iterator[Page]:
        def row(r: dict) -> tuple:
            if table in KG_TABLES:
                return r["id"], None, r
            m = r["metadata"] if fields is None else {k: v for k, v in r["metadata"].items() if k in fields}
            return r["id"], r["document"] if fields is None or "document" in fields else None, m

        return paged(map(row, self._newest_rows(table, None, vectors=False)), FETCH_PAGE)

    def fetch(self, table: str, ids: list[str], vectors: bool = True) -> Iterator[list[dict]]:
        return paged(self._newest_rows(table, set(ids), vectors), FETCH_PAGE)

    def info(self, table: str) -> CollectionInfo | None:
        m = self._manifest()
        if m is None or table not in m.totals:
            return None
        dim = m.embedder["dimension"] if m.embedder else None
        return CollectionInfo(m.totals[table], dim or None, dict(m.collections.get(table) or {}))

    def counts(self) -> dict[str, int]:
        m = self._manifest()
        return {t: (m.totals.get(t, 0) if m else 0) for t in TABLES}

    def nearest(self, table: str, vectors: np.ndarray, k: int) -> list[tuple[list[str], list[float]]]:
        """Exact cosine neighbours over every vector the bundle holds (a bundle has no index)."""
        ids, mat = [], []
        for r in self._newest_rows(table, None):
            ids.append(r["id"])
            mat.append(r["embedding"])
        if not ids:
            return [([], []) for _ in vectors]
        m = np.asarray(mat, dtype=np.float32)
        m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
        q = np.asarray(vectors, dtype=np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - q @ m.T
        out = []
        for row in dist:
            top = np.argsort(row, kind="stable")[:k]
            out.append(([ids[j] for j in top], [float(row[j]) for j in top]))
        return out

    def integrity(self, full: bool) -> list:
        return [(self.name, None)]  # a bundle's integrity is its sha256s: verify --bundle

    def knowledge_graph(self, read_only: bool = False) -> KnowledgeGraph:
        raise PalaceEtlError(f"open {self.name}: a bundle directory has no live knowledge graph",
                             hint="restore it first: palace-etl restore BUNDLE --palace NEW_DIR")

    def is_empty(self) -> bool:
        return not self.exists()

    def check_target(self) -> None:
        pass

    def replacing(self, force: bool, timeout: float, check, settings: dict | None = None):
        raise PalaceEtlError(f"restore into {self.name}: a bundle directory is not a palace",
                             hint="restore into a palace directory; to copy bundles, sync the palace into it")

    def session(self, exclusive: bool, timeout: float):
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- identity
    def identity(self) -> EmbedderIdentity | None:
        m = self._manifest()
        e = m.embedder if m else None
        return EmbedderIdentity(e["model_name"], e["dimension"]) if e else self._identity

    def set_identity(self, ident: EmbedderIdentity) -> None:
        self._identity = ident

    def claim_identity(self, ident: EmbedderIdentity) -> None:
        recorded = self.identity()
        check_identity(recorded, ident)
        if recorded is None:
            self._identity = ident

    def sidecar(self) -> bytes | None:
        latest = self._latest()
        path = latest / "sidecars" / SIDECAR if latest else None
        if path is not None and path.is_file():
            return path.read_bytes()
        ident = self.identity()
        if ident is None:
            return None
        return orjson.dumps({c: {"model_name": ident.model_name, "dimension": ident.dimension}
                             for c in (DRAWERS_COLLECTION, CLOSETS_COLLECTION)})

    def put_sidecar(self, data: bytes) -> None:
        pass  # a bundle's sidecar is written with its next bundle (from the identity)

    # ----------------------------------------------------------------- writing
    def _writable(self) -> None:
        if self.at is not None:
            raise PalaceEtlError(f"write into {self.name}: one bundle of a chain is read-only",
                                 hint=f"name the bundle directory instead: bundle:{self.out}")

    def write(self, table: str, rows: list[dict]) -> None:
        self._writable()
        for r in rows:
            self._deletes[table].discard(r["id"])
            self._rows[table][r["id"]] = r

    def delete(self, table: str, ids: list[str]) -> None:
        self._writable()
        for i in ids:
            self._rows[table].pop(i, None)
            self._deletes[table].add(i)

    def commit(self) -> None:
        """Write everything staged as one new bundle chained to the newest (full if there is none)."""
        if not any(self._rows.values()) and not any(self._deletes.values()):
            return
        with bundle_dir_lock(self.out):
            prev = self._newest()
            state = self.snapshot()
            for table, rows in self._rows.items():
                for i, r in rows.items():
                    state[table][i] = table_row_hash(table, r)
            gone = [(t, i) for t, ids in self._deletes.items() for i in sorted(ids) if i in state[t]]
            for t, i in gone:
                state[t].pop(i)
            collections = {}
            for t in COLLECTIONS:
                rows = list(self._rows[t].values())
                if rows:
                    dim = len(rows[0]["embedding"])
                    collections[t] = (dim, [records_batch(rows[s:s + FETCH_PAGE], dim)
                                            for s in range(0, len(rows), FETCH_PAGE)])
            ident = self.identity()
            prev_m = self._manifest()
            write_bundle(self.out, prev, BundleContent(
                palace=self.name, state=state, collections=collections,
                kg={t: list(self._rows[t].values()) for t in KG_TABLES}, tombstones=gone if prev else [],
                sidecar=self.sidecar(), settings=prev_m.collections if prev_m else
                {t: dict(HNSW_METADATA) for t in COLLECTIONS},
                embedder={"model_name": ident.model_name, "dimension": ident.dimension} if ident else None),
                now=dt.datetime.now(dt.timezone.utc), sealer=self._sealer(prev_m), owner=REPLICA_OWNER)
        self._forget()
        self._rows = {t: {} for t in TABLES}
        self._deletes = {t: set() for t in TABLES}

    def scrub(self, forgotten: dict[str, set[str]]) -> list[str]:
        """Rewrite every bundle of the directory that holds a forgotten row (older chains too). One
        that cannot be opened (it does not verify, or is encrypted to keys not given) is left as it
        is and named, in the notes and in ``unscrubbed``: it does not keep the others from being
        rewritten, nor a sync that carried the forget from finishing."""
        notes = []
        self.unscrubbed = []
        with bundle_dir_lock(self.out):
            for bundle in list_bundles(self.out):
                try:
                    removed = rewrite_without(bundle, forgotten, self.keys)
                except (BundleError, CryptError) as exc:
                    self.unscrubbed.append({"bundle": str(bundle), "why": str(exc)})
                    notes.append(f"{bundle}: not rewritten, it may still hold them ({exc})")
                    continue
                if removed:
                    notes.append(f"{bundle}: rewritten without " + ", ".join(f"{n} {t}" for t, n in sorted(removed.items())))
        self._forget()
        return notes

    def _sealer(self, prev: Manifest | None) -> Sealer | None:
        """A new bundle of an encrypted chain is encrypted to the keys the newest one records."""
        enc = prev.encryption if prev else None
        if enc is None:
            return None
        if enc["passphrase"] and (self.keys is None or self.keys.passphrase is None):
            raise CryptError(f"sync into {self.name}: its bundles are passphrase-encrypted, and the next one "
                             "needs the passphrase too", hint="pass --passphrase-file FILE")
        return Sealer(list(enc.get("recipients", [])), self.keys.passphrase if enc["passphrase"] else None)

    def close(self) -> None:
        self._forget()

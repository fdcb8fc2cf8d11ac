"""Sync replicas: a palace directory, a Chroma server (``http://host:port`` + a KG file), or a
directory of bundles on a shared disk. Each can list its rows as ``{table: {id: row hash}}``,
hand out full rows (vectors included: nothing is ever re-embedded), apply rows and deletions,
and keep the per-peer sync base.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Iterator

import orjson
import pyarrow.parquet as pq

from exporters.bundle import (
    COLLECTIONS,
    KG_TABLES,
    PAGE,
    _fsync_dir,
    _Guard,
    _safe_dir,
    chain,
    fetch_rows,
    kg_row_hash,
    kg_rows,
    list_bundles,
    palace_state,
    records_batch,
    row_hash,
    verify_chain,
    write_tables,
)
from exporters.manifest import MANIFEST, BundleError, Manifest
from palace.clock import instant, recorded_zone
from palace.errors import PalaceEtlError
from palace.kg import KnowledgeGraph
from palace.layout import (
    CHROMA_DB,
    SIDECAR,
    PalaceLayout,
    atomic_write,
    layout_for,
    read_sidecar,
    write_sidecar,
)
from palace.vectors import VectorStore

from .embed import EmbedderIdentity

TABLES = (*COLLECTIONS, *KG_TABLES)
SYNC_PAGE = 5000  # rows moved per page: near Chroma's max upsert batch (5461 with 6 metadata keys)
State = dict[str, dict[str, str]]


def collection_row_hash(row: dict) -> str:
    return row_hash(row["document"], row["metadata"] or {})


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


class _Base:
    name: str
    zone: dt.tzinfo  # the zone naive drawer stamps of this replica are in

    def verified(self) -> None:
        """Raise when the replica cannot be trusted as it stands (a bundle chain that does not verify)."""

    def _state_file(self) -> Path:
        raise NotImplementedError

    def sync_state(self) -> dict:
        """{"known": state at the end of the last sync, "history": {table: {id: [superseded row hashes]}},
        "tombstones": {table: {id: time}}}."""
        try:
            data = orjson.loads(self._state_file().read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            data = {}
        return {"known": data.get("known"), "history": data.get("history", {}),
                "tombstones": data.get("tombstones", {})}

    def save_sync_state(self, state: State, history: dict, tombstones: dict) -> None:
        atomic_write(self._state_file(), orjson.dumps({"known": state, "history": history, "tombstones": tombstones}))


class PalaceReplica(_Base):
    """A palace directory (embedded Chroma, under the palace lock) or a Chroma server."""

    def __init__(self, layout: PalaceLayout, lock_timeout: float = 30.0):
        self.layout = layout
        self.name = layout.location
        self.lock_timeout = lock_timeout
        self.zone = recorded_zone(layout.state_dir)
        self._stores: dict[str, VectorStore] = {}

    def _state_file(self) -> Path:
        return self.layout.state_dir / "sync-state.json"

    def _store(self, table: str) -> VectorStore:
        if table not in self._stores:
            self._stores[table] = VectorStore(self.layout, lock_timeout=self.lock_timeout,
                                              collection=COLLECTIONS[table])
        return self._stores[table]

    def close(self) -> None:
        for s in self._stores.values():
            s.close()
        self._stores = {}

    def identity(self) -> EmbedderIdentity | None:
        return read_sidecar(self.layout.sidecar_dir)

    def set_identity(self, ident: EmbedderIdentity) -> None:
        write_sidecar(self.layout.sidecar_dir, ident)

    def snapshot(self) -> State:
        self.close()  # read chroma.sqlite3 only while this process has no Chroma client on it
        if not self.layout.is_server and not (self.layout.path / CHROMA_DB).exists():
            return {t: {} for t in TABLES}
        return {t: {i: h for i, (h, _) in rows.items()} for t, rows in palace_state(self.layout).items()}

    def fetch(self, table: str, ids: list[str]) -> Iterator[list[dict]]:
        if not ids:
            return
        if table in COLLECTIONS:
            yield from fetch_rows(self._store(table), ids, SYNC_PAGE)
            return
        with KnowledgeGraph(self.layout.kg_path) as kg:
            rows = [row for _, row in kg_rows(kg, table, set(ids))]
        for s in range(0, len(rows), PAGE):
            yield rows[s:s + PAGE]

    def apply(self, table: str, rows: list[dict], deletes: list[str]) -> None:
        if table in COLLECTIONS:
            store = self._store(table)
            if rows:
                store.upsert([r["id"] for r in rows], [r["document"] for r in rows],
                             [r["metadata"] or None for r in rows], [r["embedding"] for r in rows])
            for s in range(0, len(deletes), 5000):
                if deletes[s:s + 5000]:
                    store.delete(deletes[s:s + 5000])
            return
        with KnowledgeGraph(self.layout.kg_path) as kg:
            kg.replace_rows(table, rows)
            if deletes:
                kg.delete_rows(table, deletes)

    def commit(self) -> None:
        self.close()


class BundleReplica(_Base):
    """A directory of bundles: reads its newest bundle's chain; writes by adding an incremental bundle."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.name = f"bundle:{self.out.resolve()}"
        self.zone = recorded_zone(None)
        self._rows: dict[str, list[dict]] = {t: [] for t in TABLES}
        self._deletes: list[tuple[str, str]] = []
        self._identity: EmbedderIdentity | None = None

    def _state_file(self) -> Path:
        return self.out / ".sync-state.json"

    def _latest(self) -> Path | None:
        bundles = list_bundles(self.out)
        return bundles[-1] if bundles else None

    def close(self) -> None:
        pass

    def identity(self) -> EmbedderIdentity | None:
        latest = self._latest()
        e = Manifest.load(latest).embedder if latest else None
        return EmbedderIdentity(e["model_name"], e["dimension"]) if e else self._identity

    def set_identity(self, ident: EmbedderIdentity) -> None:
        self._identity = ident

    def verified(self) -> None:
        """Refuse a damaged chain before anything is planned from it: a state file short of rows
        would otherwise make sync delete those drawers everywhere."""
        latest = self._latest()
        if latest is None:
            return
        problems = verify_chain(latest)
        if problems:
            raise BundleError(f"sync replica {self.name}: the newest bundle does not verify, nothing "
                              f"written: {problems[0]}", hint=f"palace-etl verify --bundle {latest}")

    def snapshot(self) -> State:
        state: State = {t: {} for t in TABLES}
        latest = self._latest()
        if latest is not None:
            for r in pq.read_table(latest / "state.parquet").to_pylist():
                state.setdefault(r["table"], {})[r["id"]] = r["hash"]
        return state

    def fetch(self, table: str, ids: list[str]) -> Iterator[list[dict]]:
        wanted, found = set(ids), []
        latest = self._latest()
        for link in reversed(chain(latest)) if latest else []:  # newest version of each row wins
            path = link / f"{table}.parquet"
            if not wanted or not path.exists():
                continue
            for row in pq.read_table(path).to_pylist():
                if row["id"] in wanted:
                    wanted.discard(row["id"])
                    if table in COLLECTIONS:
                        row = {"id": row["id"], "document": row["document"], "metadata": orjson.loads(row["metadata"]),
                               "embedding": row["embedding"]}
                    found.append(row)
        for s in range(0, len(found), PAGE):
            yield found[s:s + PAGE]

    def apply(self, table: str, rows: list[dict], deletes: list[str]) -> None:
        self._rows[table] += rows
        self._deletes += [(table, i) for i in deletes]

    def commit(self) -> None:
        """Write everything applied as one new bundle chained to the newest (full if there is none)."""
        if not any(self._rows.values()) and not self._deletes:
            return
        _safe_dir(self.out)
        with _Guard(self.out):
            prev = self._latest()
            state = self.snapshot()
            for table, rows in self._rows.items():
                for r in rows:
                    state[table][r["id"]] = collection_row_hash(r) if table in COLLECTIONS else kg_row_hash(r)
            for table, i in self._deletes:
                state[table].pop(i, None)
            now = dt.datetime.now(dt.timezone.utc)
            name = f"palace-{now:%Y%m%dT%H%M%S%fZ}-{'incr' if prev else 'full'}"
            tmp = self.out / f".tmp-{name}"
            tmp.mkdir(mode=0o700)
            try:
                dims = {t: len(rows[0]["embedding"]) for t, rows in self._rows.items() if t in COLLECTIONS and rows}
                collections = {t: (dims[t], iter([records_batch(self._rows[t], dims[t])])) for t in dims}
                kg = {t: self._rows[t] for t in KG_TABLES}
                sidecar = None
                ident = self.identity()
                if ident is not None:  # staged beside the bundle, not inside it
                    sidecar = self.out / f".{name}.{SIDECAR}"
                    sidecar.write_bytes(orjson.dumps({c: {"model_name": ident.model_name,
                                                          "dimension": ident.dimension} for c in COLLECTIONS.values()}))
                try:
                    files, _ = write_tables(tmp, collections, kg, self._deletes if prev else [], state, sidecar)
                finally:
                    if sidecar is not None:
                        sidecar.unlink()
                prev_m = Manifest.load(prev) if prev else None
                m = Manifest(name=name, kind="incremental" if prev else "full", created_at=now.isoformat(),
                             palace=self.name, embedder={"model_name": ident.model_name, "dimension": ident.dimension}
                             if ident else None, collections=prev_m.collections if prev_m else {},
                             counts={t: len(r) for t, r in self._rows.items()} | {"tombstones": len(self._deletes) if prev else 0},
                             totals={t: len(v) for t, v in state.items()}, files=files,
                             previous=prev.name if prev else None, watermark={"exported_at": now.isoformat()})
                (tmp / MANIFEST).write_bytes(m.to_json())
                os.chmod(tmp / MANIFEST, 0o600)
                _fsync_dir(tmp)
                os.rename(tmp, self.out / name)
                _fsync_dir(self.out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self._rows = {t: [] for t in TABLES}
        self._deletes = []


def replica_kind(spec: str) -> str:
    """``palace``, ``server`` or ``bundle``, from an explicit scheme or one unambiguous marker.

    ``bundle:DIR`` and ``http(s)://`` say it outright. A directory is a palace when it holds
    ``chroma.sqlite3`` and a bundle directory when it holds bundles (or a bundle replica's sync
    state); both at once (a bundle exported into the palace) is refused as ambiguous. A new or empty
    directory is a palace."""
    if spec.startswith("bundle:"):
        return "bundle"
    if spec.startswith(("http://", "https://")):
        return "server"
    path = Path(spec)
    is_palace = (path / CHROMA_DB).exists()
    is_bundles = path.is_dir() and (bool(list_bundles(path)) or (path / ".sync-state.json").exists())
    if is_palace and is_bundles:
        raise PalaceEtlError(f"open replica {spec}: it holds both a palace (chroma.sqlite3) and bundles; "
                             "which one is meant?", hint=f"say bundle:{spec} for the bundles, or move them out "
                             "of the palace directory")
    return "bundle" if is_bundles else "palace"


def replica_root(spec: str) -> str:
    """What a replica is, whatever spelling names it (for refusing a sync of a replica with itself)."""
    if spec.startswith(("http://", "https://")):
        return spec.rstrip("/")
    return str(Path(spec.removeprefix("bundle:")).expanduser().resolve())


def open_replica(spec: str, kg: Path | None = None, lock_timeout: float = 30.0):
    """``bundle:DIR`` or a directory of bundles -> BundleReplica; a palace dir or URL -> PalaceReplica."""
    if replica_kind(spec) == "bundle":
        return BundleReplica(Path(spec.removeprefix("bundle:")))
    return PalaceReplica(layout_for(spec, kg), lock_timeout)

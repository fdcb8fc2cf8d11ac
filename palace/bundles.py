"""The bundle format: a directory ``<out>/palace-<UTC stamp>-<full|incr>/`` per backup.

A bundle holds zstd Parquet files -- drawers and closets with their vectors, KG entities and
triples, tombstones -- a ``state.parquet`` (id and row hash of every row the palace held, which the
next incremental diffs against), the palace's sidecars, and ``manifest.json`` with a sha256 per
file. ``write_bundle`` is the one writer: a temp directory, fsync, re-verify, rename, so a crash
never leaves a half bundle that looks complete. Whoever writes holds ``bundle_dir_lock`` on the
directory, which also clears temp directories a killed writer left behind.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .ids import sha256_file
from .layout import SIDECAR, atomic_dir, safe_dir
from .lock import dir_lock
from .manifest import MANIFEST, NAME_RE, BundleError, Manifest, bundle_name, check_files
from .rows import State, record_schema

STATE_SCHEMA = pa.schema([("table", pa.string()), ("id", pa.string()), ("hash", pa.string())])
TOMBSTONE_SCHEMA = pa.schema([("table", pa.string()), ("id", pa.string())])
TEMP_PREFIX = ".tmp-palace-"


# ------------------------------------------------------------------------ reading
def list_bundles(out: Path) -> list[Path]:
    """Complete bundles in ``out``, oldest first (temp directories and strangers are not bundles)."""
    if not Path(out).is_dir():
        return []
    return sorted(p for p in Path(out).iterdir()
                  if p.is_dir() and not p.is_symlink() and NAME_RE.fullmatch(p.name) and (p / MANIFEST).exists())


def chain(bundle: Path) -> list[Path]:
    """The full bundle and every incremental up to ``bundle``, in apply order."""
    out, seen = [], set()
    cur: Path | None = Path(bundle)
    while cur is not None:
        if cur in seen:
            raise BundleError(f"read bundle chain: {cur} repeats")
        seen.add(cur)
        m = Manifest.load(cur)
        out.append(cur)
        if m.kind == "full":
            return list(reversed(out))
        if not m.previous:
            raise BundleError(f"read bundle {cur}: incremental without a previous bundle")
        cur = cur.parent / m.previous  # a validated bundle name: a sibling, never a path
        if cur.is_symlink() or not cur.is_dir():
            raise BundleError(f"read bundle chain: {cur} (needed by {out[-1].name}) is missing")
    raise BundleError(f"read bundle chain of {bundle}: no full bundle")


def verify_chain(bundle: Path) -> list[str]:
    """Problems with a bundle and every bundle it builds on: manifests, files, sha256s, row counts."""
    problems = []
    for link in chain(Path(bundle)):
        problems += check_files(link, Manifest.load(link))
    return problems


def usable_parent(prev: Path) -> tuple[Path | None, str | None]:
    """(``prev``, None) when an incremental may chain onto it, else (None, why not)."""
    try:
        problems = verify_chain(prev)
    except BundleError as exc:
        problems = [str(exc)]
    if problems:
        return None, f"the newest bundle {prev.name} does not verify ({problems[0]}); writing a full bundle"
    return prev, None


def bundle_state(bundle: Path) -> State:
    """What the palace held when ``bundle`` was written: {table: {id: row hash}}."""
    state: State = {}
    for r in pq.read_table(Path(bundle) / "state.parquet").to_pylist():
        state.setdefault(r["table"], {})[r["id"]] = r["hash"]
    return state


def tombstones(bundle: Path) -> dict[str, list[str]]:
    gone: dict[str, list[str]] = {}
    for t in pq.read_table(Path(bundle) / "tombstones.parquet").to_pylist():
        gone.setdefault(t["table"], []).append(t["id"])
    return gone


# ------------------------------------------------------------------------ writing
@contextlib.contextmanager
def bundle_dir_lock(out: Path) -> Iterator[Path]:
    """Hold the directory's writer lock (non-blocking: overlapping cron runs fail fast) and clear the
    temp directories killed writers left (only the lock holder writes them, so all are stale)."""
    out = Path(out)
    safe_dir(out)
    with dir_lock(out / ".export.lock", f"export to {out}"):
        for p in out.iterdir():
            if p.name.startswith(TEMP_PREFIX) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        yield out


@dataclass
class BundleContent:
    """What goes into one bundle. ``collections`` batches are streamed; a reader may drop rows it
    found vanished from ``state`` while they stream, because ``state`` is written after them."""

    palace: str
    state: State
    collections: dict[str, tuple[int, Iterable[pa.RecordBatch]]] = field(default_factory=dict)  # table -> (dim, batches)
    kg: dict[str, list[dict]] = field(default_factory=dict)
    tombstones: list[tuple[str, str]] = field(default_factory=list)
    sidecar: bytes | None = None
    embedder: dict | None = None
    settings: dict = field(default_factory=dict)  # collection settings for a restore (hnsw:*)
    watermark: dict | Callable[[], dict] = field(default_factory=dict)  # called after the tables are written


def write_bundle(out: Path, previous: Path | None, content: BundleContent,
                 now: dt.datetime | None = None) -> Manifest:
    """Write ``content`` as a new bundle in ``out`` (an incremental of ``previous``, or full); the caller
    holds ``bundle_dir_lock(out)``. The bundle is checked against its own manifest before it is
    renamed into place."""
    now = now or dt.datetime.now(dt.timezone.utc)
    name = bundle_name(now, previous is not None)
    with atomic_dir(Path(out) / name, f".tmp-{name}-") as tmp:  # starts with TEMP_PREFIX
        written = _write_tables(tmp, content)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        m = Manifest(name=name, kind="incremental" if previous else "full", created_at=now.isoformat(),
                     palace=content.palace, embedder=content.embedder, collections=content.settings,
                     counts=written | {"tombstones": len(content.tombstones)},
                     totals={t: len(v) for t, v in content.state.items()}, files=files,
                     previous=previous.name if previous else None,
                     watermark={"exported_at": now.isoformat(),
                                **(content.watermark() if callable(content.watermark) else content.watermark)})
        (tmp / MANIFEST).write_bytes(m.to_json())
        os.chmod(tmp / MANIFEST, 0o600)
        problems = check_files(tmp, Manifest.load(tmp, name))
        if problems:  # never put a bundle in place that does not verify
            raise BundleError(f"write bundle {Path(out) / name}: the bundle written does not verify: {problems[0]}")
    return m


def _write_tables(tmp: Path, content: BundleContent) -> dict[str, int]:
    written = {}
    for table, (dim, batches) in content.collections.items():
        written[table] = _write_table(tmp / f"{table}.parquet", record_schema(dim), batches)
    for table, rows in content.kg.items():
        if rows:
            batch = pa.RecordBatch.from_pylist(rows)
            written[table] = _write_table(tmp / f"{table}.parquet", batch.schema, [batch])
    _write_table(tmp / "tombstones.parquet", TOMBSTONE_SCHEMA, [pa.RecordBatch.from_pylist(
        [{"table": t, "id": i} for t, i in content.tombstones], schema=TOMBSTONE_SCHEMA)])
    _write_table(tmp / "state.parquet", STATE_SCHEMA, [pa.RecordBatch.from_pylist(
        [{"table": t, "id": i, "hash": h} for t, rows in content.state.items() for i, h in rows.items()],
        schema=STATE_SCHEMA)])
    (tmp / "sidecars").mkdir(mode=0o700)
    if content.sidecar is not None:
        (tmp / "sidecars" / SIDECAR).write_bytes(content.sidecar)
        os.chmod(tmp / "sidecars" / SIDECAR, 0o600)
    return written


def _write_table(path: Path, schema: pa.Schema, batches) -> int:
    n = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for b in batches:
            if b.num_rows:
                w.write_batch(b)
                n += b.num_rows
    os.chmod(path, 0o600)
    return n

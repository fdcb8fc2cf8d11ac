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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .crypt import KEY_FILE, CryptError, Keys, Sealer
from .ids import sha256_file
from .layout import SIDECAR, atomic_dir, safe_dir
from .lock import dir_lock
from .manifest import (
    MANIFEST,
    NAME_RE,
    SEALED,
    SEALED_MANIFEST,
    BundleError,
    Manifest,
    bundle_name,
    check_files,
)
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


def is_sealed(bundle: Path) -> bool:
    """Is ``bundle`` (or any bundle it builds on) encrypted?"""
    return any(Manifest.load(link).sealed for link in chain(Path(bundle)))


@contextlib.contextmanager
def readable(bundle: Path, keys: Keys | None) -> Iterator[Path]:
    """``bundle`` in plaintext, for anything that reads its tables: the bundle itself, or, when its
    chain is encrypted, a private temp copy of the chain (0700, removed on exit), each file's
    ciphertext checked against the plain manifest, decrypted with ``keys``, then checked against the
    decrypted manifest's sha256s and row counts. Nothing is yielded from a chain that fails."""
    links = chain(Path(bundle))
    manifests = [Manifest.load(link) for link in links]
    if not any(m.sealed for m in manifests):
        yield Path(bundle)
        return
    if keys is None:
        raise CryptError(f"read bundle {bundle}: it is encrypted",
                         hint="pass --identity FILE (an age identity) or --passphrase-file FILE")
    tmp = Path(tempfile.mkdtemp(prefix="palace-etl-decrypted-"))
    try:
        for link, outer in zip(links, manifests):
            problems = check_files(link, outer)
            if problems:
                raise BundleError(f"read bundle {link}: it does not verify, nothing decrypted: {problems[0]}")
            dst = tmp / link.name
            dst.mkdir(mode=0o700)
            (dst / "sidecars").mkdir(mode=0o700)
            if not outer.sealed:
                for rel in (*outer.files, MANIFEST):
                    shutil.copyfile(link / rel, dst / rel)
                continue
            idents = keys.for_bundle(link)
            for rel in sorted(outer.files, key=lambda r: r != SEALED_MANIFEST):  # the manifest first
                if rel != KEY_FILE:
                    keys.decrypt(link / rel, dst / rel.removesuffix(SEALED), idents, link)
            inner = Manifest.load(dst)
            if (inner.kind, inner.previous, inner.sealed) != (outer.kind, outer.previous, False):
                raise BundleError(f"read bundle {link}: its encrypted manifest does not match its plain one")
            problems = check_files(dst, inner)
            if problems:
                raise BundleError(f"read bundle {link}: decrypted, it does not verify: {problems[0]}")
        yield tmp / Path(bundle).name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    wing: str | None = None  # the one wing this bundle holds (no KG), or the whole palace
    watermark: dict | Callable[[], dict] = field(default_factory=dict)  # called after the tables are written


def write_bundle(out: Path, previous: Path | None, content: BundleContent,
                 now: dt.datetime | None = None, sealer: Sealer | None = None) -> Manifest:
    """Write ``content`` as a new bundle in ``out`` (an incremental of ``previous``, or full); the caller
    holds ``bundle_dir_lock(out)``. The bundle is checked against its own manifest before it is
    renamed into place. With ``sealer`` every file, the manifest included, is encrypted as it is
    written; the plain manifest then holds only the ciphertexts' sha256s and the chain link.
    Returns the (inner) manifest."""
    now = now or dt.datetime.now(dt.timezone.utc)
    name = bundle_name(now, previous is not None)
    with atomic_dir(Path(out) / name, f".tmp-{name}-") as tmp:  # starts with TEMP_PREFIX
        with contextlib.ExitStack() as stack:
            seal = stack.enter_context(sealer.keyed(tmp)) if sealer else None
            digests: dict[str, str] = {}
            sizes: dict[str, int] = {}

            @contextlib.contextmanager
            def sink(rel: str):
                if seal is None:
                    with open(os.open(tmp / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                        yield f
                    digests[rel], sizes[rel] = sha256_file(tmp / rel), (tmp / rel).stat().st_size
                else:
                    with seal.writer(tmp / (rel + SEALED)) as f:
                        yield f
                    digests[rel], sizes[rel] = f.sha.hexdigest(), f.size

            written = _write_tables(tmp, content, sink)
            m = Manifest(name=name, kind="incremental" if previous else "full", created_at=now.isoformat(),
                         palace=content.palace, embedder=content.embedder, collections=content.settings,
                         counts=written | {"tombstones": len(content.tombstones)},
                         totals={t: len(v) for t, v in content.state.items()}, files=dict(sorted(digests.items())),
                         sizes=dict(sorted(sizes.items())),
                         previous=previous.name if previous else None, wing=content.wing,
                         encryption=sealer.describe() if sealer else None,
                         watermark={"exported_at": now.isoformat(),
                                    **(content.watermark() if callable(content.watermark) else content.watermark)})
            with sink(MANIFEST) as f:
                f.write(m.to_json())
        if sealer is None:
            written_m = Manifest.load(tmp, name)
        else:
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            outer = Manifest(name=name, kind=m.kind, created_at=m.created_at, palace="", embedder=None,
                             collections={}, files=files, previous=m.previous,
                             sizes={rel: (tmp / rel).stat().st_size for rel in files},
                             encryption={"scheme": "age", "passphrase": sealer.passphrase is not None})
            (tmp / MANIFEST).write_bytes(outer.to_json())
            os.chmod(tmp / MANIFEST, 0o600)
            written_m = Manifest.load(tmp, name)
        problems = check_files(tmp, written_m)
        if problems:  # never put a bundle in place that does not verify
            raise BundleError(f"write bundle {Path(out) / name}: the bundle written does not verify: {problems[0]}")
    return m


def _write_tables(tmp: Path, content: BundleContent, sink) -> dict[str, int]:
    written = {}
    for table, (dim, batches) in content.collections.items():
        written[table] = _write_table(sink, f"{table}.parquet", record_schema(dim), batches)
    for table, rows in content.kg.items():
        if rows:
            batch = pa.RecordBatch.from_pylist(rows)
            written[table] = _write_table(sink, f"{table}.parquet", batch.schema, [batch])
    _write_table(sink, "tombstones.parquet", TOMBSTONE_SCHEMA, [pa.RecordBatch.from_pylist(
        [{"table": t, "id": i} for t, i in content.tombstones], schema=TOMBSTONE_SCHEMA)])
    _write_table(sink, "state.parquet", STATE_SCHEMA, [state_batch(content.state)])
    (tmp / "sidecars").mkdir(mode=0o700)
    if content.sidecar is not None:
        with sink(f"sidecars/{SIDECAR}") as f:
            f.write(content.sidecar)
    return written


def state_batch(state: State) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [{"table": t, "id": i, "hash": h} for t, rows in state.items() for i, h in rows.items()], schema=STATE_SCHEMA)


def _write_table(sink, rel: str, schema: pa.Schema, batches) -> int:
    n = 0
    with sink(rel) as f, pq.ParquetWriter(f, schema, compression="zstd") as w:
        for b in batches:
            if b.num_rows:
                w.write_batch(b)
                n += b.num_rows
    return n

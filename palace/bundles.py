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
import functools
import hashlib
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from . import scratch
from .crypt import KEY_FILE, CryptError, Keys, Sealer
from .hashed import HashRecord
from .ids import HashingWriter, sha256_file
from .layout import SIDECAR, atomic_dir, atomic_write, safe_dir
from .lock import dir_lock
from .manifest import (
    MANIFEST,
    NAME_RE,
    SEALED,
    SEALED_MANIFEST,
    SIDECAR_FILE,
    BundleError,
    Manifest,
    bundle_name,
    bundle_time,
    check_files,
    read_parquet,
)
from .rows import COLLECTIONS, KG_TABLES, State, id_key, record_schema

STATE_SCHEMA = pa.schema([("table", pa.string()), ("id", pa.string()), ("hash", pa.string())])
TOMBSTONE_SCHEMA = pa.schema([("table", pa.string()), ("id", pa.string())])
TEMP_PREFIX = ".tmp-palace-"
OLD_RE = re.compile(rf"\.old-({NAME_RE.pattern})-\d+")  # a bundle ``atomic_dir(replace=True)`` set aside


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


def verify_chain(bundle: Path, hashes: HashRecord | None = None) -> list[str]:
    """Problems with a bundle and every bundle it builds on: manifests, files, sha256s (with
    ``hashes``, what this machine hashed before and has not changed since is not re-read), row counts."""
    problems = []
    for link in chain(Path(bundle)):
        problems += check_files(link, Manifest.load(link), hashes)
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
    with _decrypted(list(zip(links, manifests)), keys) as plain:
        yield plain


@contextlib.contextmanager
def _decrypted(links: list[tuple[Path, Manifest]], keys: Keys | None) -> Iterator[Path]:
    """``links`` (bundle, its plain manifest), oldest first, decrypted and checked into a private temp
    directory removed on exit; yields the last one's plaintext copy."""
    if keys is None:
        raise CryptError(f"read bundle {links[-1][0]}: it is encrypted",
                         hint="pass --identity FILE (an age identity) or --passphrase-file FILE")
    with scratch.scratch(scratch.DECRYPTED) as tmp:
        for link, outer in links:
            _plain_copy(link, outer, keys, tmp / link.name)
        yield tmp / links[-1][0].name


def _plain_copy(link: Path, outer: Manifest, keys: Keys, dst: Path) -> None:
    """``link`` in plaintext at ``dst``: its ciphertexts checked, decrypted, checked again."""
    problems = check_files(link, outer)
    if problems:
        raise BundleError(f"read bundle {link}: it does not verify, nothing decrypted: {problems[0]}")
    dst.mkdir(mode=0o700)
    (dst / "sidecars").mkdir(mode=0o700)
    if not outer.sealed:
        for rel in (*outer.files, MANIFEST):
            shutil.copyfile(link / rel, dst / rel)
        return
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


@contextlib.contextmanager
def _plain_link(link: Path, keys: Keys | None) -> Iterator[Path]:
    """One bundle in plaintext, checked: itself, or a private decrypted copy."""
    outer = Manifest.load(link)
    if not outer.sealed:
        problems = check_files(link, outer)
        if problems:
            raise BundleError(f"read bundle {link}: it does not verify: {problems[0]}")
        yield link
        return
    with _decrypted([(link, outer)], keys) as plain:
        yield plain


def usable_parent(prev: Path, hashes: HashRecord | None = None) -> tuple[Path | None, str | None]:
    """(``prev``, None) when an incremental may chain onto it, else (None, why not)."""
    try:
        problems = verify_chain(prev, hashes)
    except BundleError as exc:
        problems = [str(exc)]
    if problems:
        return None, f"the newest bundle {prev.name} does not verify ({problems[0]}); writing a full bundle"
    return prev, None


@dataclass(frozen=True)
class Owner:
    """Whose bundles these are: ``host``'s (this machine's host name when None, as restic groups its
    snapshots) exports of ``palace``, or of its ``wing`` (a line of its own: a wing's bundle is no
    backup of the palace). Only its own bundles does an export chain onto or remove by retention."""
    palace: str
    wing: str | None = None
    host: str | None = None

    @functools.cached_property  # (a frozen dataclass keeps it: it is written to the instance's __dict__)
    def tag(self) -> str:
        """An opaque tag, recorded in each bundle: an encrypted bundle's plain manifest names no palace."""
        whose = [self.host or socket.gethostname(), self.palace, *([self.wing] if self.wing is not None else [])]
        return hashlib.sha256("\0".join(whose).encode()).hexdigest()[:16]

    def owns(self, bundle: Path) -> bool:
        """Whether ``bundle`` is one of these: another palace's, wing's, host's or sync replica's in the
        same directory are left alone. A bundle written before owners were recorded goes by the
        palace and wing its manifest names (an encrypted one names none, and counts as anyone's, as it
        did then); one whose manifest cannot be read counts as anyone's (retention never removes it;
        an incremental does not chain onto it)."""
        try:
            m = Manifest.load(bundle)
        except BundleError:
            return True
        recorded = _owner(m)
        if recorded:
            return recorded == self.tag
        return m.palace == "" or (m.palace == self.palace and m.wing == self.wing)

    def split(self, bundles: list[Path]) -> tuple[list[Path], list[Path]]:
        """``bundles`` (in their order) as (these owner's, everyone else's): one manifest read each."""
        mine = {b: self.owns(b) for b in bundles}
        return [b for b in bundles if mine[b]], [b for b in bundles if not mine[b]]


REPLICA_OWNER = "sync-replica"  # the owner of the bundles a sync replica directory writes (whichever machine syncs)


def _owner(m: Manifest) -> str | None:
    """The owner tag a bundle's manifest records (None before owners were recorded)."""
    tag = m.watermark.get("owner")
    return tag if isinstance(tag, str) else None


def replica_line(bundles: list[Path]) -> list[Path]:
    """The bundles (oldest first) a sync replica directory reads as its own: those its syncs wrote,
    and any whose manifest cannot be read (refused when newest, never skipped). An export written
    into the directory is one palace's content, not the replica's: taken for the replica's state it
    would delete everything other machines synced into it since. A directory no sync wrote into
    yet is read as it is (an export starts a replica; its first bundle chains onto it)."""
    def replica(b: Path) -> bool | None:
        try:
            m = Manifest.load(b)
        except BundleError:
            return None
        tag = _owner(m)
        return tag == REPLICA_OWNER if tag else m.palace.startswith("bundle:")

    kinds = {b: replica(b) for b in bundles}
    if True not in kinds.values():
        return bundles
    return [b for b, k in kinds.items() if k is not False]


def bundle_state(bundle: Path) -> State:
    """What the palace held when ``bundle`` was written: {table: {id: row hash}}. Read a column at a
    time, not a dict per row, and cut into tables where the table name changes (the writer groups
    rows by table), without a compute kernel (their first use costs more than the whole read)."""
    path = Path(bundle) / "state.parquet"
    table = read_parquet(path, read_dictionary=["table"])
    names = table["table"].combine_chunks()
    if names.null_count:
        raise BundleError(f"read bundle state {path}: a row without a table")
    which = names.indices.to_numpy(zero_copy_only=False)
    if not len(which):
        return {}
    cuts = (np.flatnonzero(which[1:] != which[:-1]) + 1).tolist()
    ids, hashes, tables = table["id"].to_pylist(), table["hash"].to_pylist(), names.dictionary.to_pylist()
    state: State = {}
    for start, end in zip([0, *cuts], [*cuts, len(which)]):
        state.setdefault(tables[which[start]], {}).update(zip(ids[start:end], hashes[start:end]))
    return state


def tombstones(bundle: Path) -> dict[str, list[str]]:
    gone: dict[str, list[str]] = {}
    for t in read_parquet(Path(bundle) / "tombstones.parquet").to_pylist():
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
        for p in out.iterdir():  # a rewrite killed between its two renames: the old bundle was set aside
            m = OLD_RE.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink():
                if (out / m.group(1)).exists():
                    shutil.rmtree(p)  # the rewritten bundle is in place: the old one (and what it held) goes
                else:
                    os.rename(p, out / m.group(1))  # put it back: the chain stays whole until the re-run
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
                 now: dt.datetime | None = None, sealer: Sealer | None = None,
                 hashes: HashRecord | None = None, owner: str | None = None) -> Manifest:
    """Write ``content`` as a new bundle in ``out`` (an incremental of ``previous``, or full); the caller
    holds ``bundle_dir_lock(out)``. The bundle is checked against its own manifest before it is
    renamed into place (what that check read goes into ``hashes``). With ``sealer`` every file, the
    manifest included, is encrypted as it is written; the plain manifest then holds only the
    ciphertexts' sha256s, the chain link and ``owner`` (``Owner.tag``). Returns the (inner) manifest."""
    clock = now or dt.datetime.now(dt.timezone.utc)
    now, newest = _after_newest(Path(out), clock)
    name = bundle_name(now, previous is not None)
    stamps = {"exported_at": clock.isoformat()} | ({"named_after": newest} if newest else {}) | \
        ({"owner": owner} if owner else {})
    with atomic_dir(Path(out) / name, f".tmp-{name}-") as tmp:  # starts with TEMP_PREFIX
        return _fill(tmp, name, now.isoformat(), previous.name if previous else None, content, sealer, stamps, hashes)


def _after_newest(out: Path, clock: dt.datetime) -> tuple[dt.datetime, str | None]:
    """The time a new bundle of ``out`` is named by: the clock's, or, when the clock is not past the
    newest bundle there (it was ahead when that one was written, or is behind now), just after that
    one, which is then named: bundles sort in the order they were written, and retention and
    chaining go by that order."""
    newest = max(list_bundles(out), key=lambda b: bundle_time(b.name), default=None) if out.is_dir() else None
    if newest is None or clock.astimezone(dt.timezone.utc).replace(tzinfo=None) > bundle_time(newest.name):
        return clock, None
    return (bundle_time(newest.name) + dt.timedelta(microseconds=1)).replace(tzinfo=dt.timezone.utc), newest.name


def _fill(tmp: Path, name: str, created_at: str, previous: str | None, content: BundleContent,
          sealer: Sealer | None, watermark: dict, hashes: HashRecord | None = None) -> Manifest:
    """Write the bundle ``name`` into the empty directory ``tmp`` and check it; returns its (inner) manifest."""
    with contextlib.ExitStack() as stack:
        seal = stack.enter_context(sealer.keyed(tmp)) if sealer else None
        digests: dict[str, str] = {}
        sizes: dict[str, int] = {}

        @contextlib.contextmanager
        def sink(rel: str):
            if seal is None:
                with open(os.open(tmp / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    h = HashingWriter(f)  # hashed as written; check_files re-reads what reached the disk
                    yield h
                digests[rel], sizes[rel] = h.sha.hexdigest(), h.size
            else:
                with seal.writer(tmp / (rel + SEALED)) as f:
                    yield f
                digests[rel], sizes[rel] = f.sha.hexdigest(), f.size

        written = _write_tables(tmp, content, sink)
        m = Manifest(name=name, kind="incremental" if previous else "full", created_at=created_at,
                     palace=content.palace, embedder=content.embedder, collections=content.settings,
                     counts=written | {"tombstones": len(content.tombstones)},
                     totals={t: len(v) for t, v in content.state.items()}, files=dict(sorted(digests.items())),
                     sizes=dict(sorted(sizes.items())), previous=previous, wing=content.wing,
                     encryption=sealer.describe() if sealer else None,
                     watermark=watermark | (content.watermark() if callable(content.watermark) else content.watermark))
        with sink(MANIFEST) as f:
            f.write(m.to_json())
    if sealer is not None:
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        outer = Manifest(name=name, kind=m.kind, created_at=m.created_at, palace="", embedder=None,
                         collections={}, files=files, previous=m.previous,
                         sizes={rel: (tmp / rel).stat().st_size for rel in files},
                         encryption={"scheme": "age", "passphrase": sealer.passphrase is not None},
                         watermark={k: v for k, v in m.watermark.items() if k == "owner"})
        (tmp / MANIFEST).write_bytes(outer.to_json())
        os.chmod(tmp / MANIFEST, 0o600)
    problems = check_files(tmp, Manifest.load(tmp, name), hashes)
    if problems:  # never put a bundle in place that does not verify
        raise BundleError(f"write bundle {name}: the bundle written does not verify: {problems[0]}")
    return m


def rewrite_without(link: Path, drop: dict[str, set[str]], keys: Keys | None) -> dict[str, int]:
    """Rewrite the bundle ``link`` in place without the rows whose ``id_key`` is in ``drop``
    ({table: keys}): its tables, state and tombstones, re-encrypted to the keys it records; same
    name and chain link, new files and checksums. The caller holds ``bundle_dir_lock``. The new
    bundle is complete and checked before it takes the old one's place (``atomic_dir``; a crash in
    between is repaired by the next ``bundle_dir_lock``). Returns the rows removed per table ({}
    when it held none)."""
    def gone(t: str, i: str) -> bool:
        return bool(drop.get(t)) and id_key(i) in drop[t]

    with _plain_link(link, keys) as plain:
        m = Manifest.load(plain)
        state = bundle_state(plain)
        tombs = tombstones(plain)
        files = {t: plain / f"{t}.parquet" for t in (*COLLECTIONS, *KG_TABLES) if f"{t}.parquet" in m.files}
        removed = {t: sum(gone(t, i) for i in rows) for t, rows in state.items()}
        for t, path in files.items():  # an incremental's rows may have left the state since
            ids = read_parquet(path, ["id"]).column("id").to_pylist()
            removed[t] = max(removed.get(t, 0), sum(gone(t, i) for i in ids))
        removed = {t: n for t, n in removed.items() if n}
        if not removed and not any(gone(t, i) for t, ids in tombs.items() for i in ids):
            return {}
        content = BundleContent(
            palace=m.palace, embedder=m.embedder, settings=m.collections, wing=m.wing,
            state={t: {i: h for i, h in rows.items() if not gone(t, i)} for t, rows in state.items()},
            tombstones=[(t, i) for t, ids in tombs.items() for i in ids if not gone(t, i)],
            sidecar=(plain / SIDECAR_FILE).read_bytes() if (plain / SIDECAR_FILE).is_file() else None)
        for t, path in files.items():
            pf = pq.ParquetFile(path)
            kept = _without(pf, lambda i, t=t: gone(t, i))
            if t in COLLECTIONS:
                content.collections[t] = (pf.schema_arrow.field("embedding").type.list_size, kept)
            else:
                content.kg[t] = [r for b in kept for r in b.to_pylist()]
        sealer = None
        if m.encryption is not None:
            if m.encryption["passphrase"] and (keys is None or keys.passphrase is None):
                raise CryptError(f"rewrite bundle {link}: it is passphrase-encrypted, and so must its new files be",
                                 hint="pass --passphrase-file FILE")
            sealer = Sealer(list(m.encryption.get("recipients", [])), keys.passphrase if m.encryption["passphrase"]
                            else None)
        with atomic_dir(link, f".tmp-{link.name}-", replace=True) as tmp:
            _fill(tmp, m.name, m.created_at, m.previous, content, sealer,
                  dict(m.watermark) | {"rewritten_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return removed


def _without(pf: pq.ParquetFile, gone) -> Iterator[pa.RecordBatch]:
    for batch in pf.iter_batches(batch_size=5000):
        yield batch.filter(pa.array([not gone(i) for i in batch.column("id").to_pylist()], pa.bool_()))


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
    tables, ids, hashes = [], [], []
    for t, rows in state.items():
        tables += [t] * len(rows)
        ids += rows.keys()
        hashes += rows.values()
    return pa.RecordBatch.from_arrays([pa.array(tables, pa.string()), pa.array(ids, pa.string()),
                                       pa.array(hashes, pa.string())], schema=STATE_SCHEMA)


UNIQUE_COLUMNS = ("id", "hash")


def _write_table(sink, rel: str, schema: pa.Schema, batches) -> int:
    """Write ``batches`` as one Parquet file. Vectors are stored without a dictionary (pyarrow's
    default tries one on every float and gives up, which cost most of an export's write time) and
    byte-stream-split, which zstd compresses better than plain floats; ids and hashes, unique per
    row, without one either (a dictionary of them only costs time to build and to read)."""
    vectors = [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]
    n = 0
    with sink(rel) as f, pq.ParquetWriter(f, schema, compression="zstd",
                                          use_dictionary=[c for c in schema.names
                                                          if c not in vectors and c not in UNIQUE_COLUMNS],
                                          use_byte_stream_split=[f"{c}.list.element" for c in vectors]) as w:
        for b in batches:
            if b.num_rows:
                w.write_batch(b)
                n += b.num_rows
    return n


# ------------------------------------------------------------------------ where a palace's bundles are
def _exports_file() -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "palace-etl" / "exports.json"


def remember_export(palace: str, out: Path) -> None:
    """Record that ``palace`` was exported to ``out``, so ``forget`` finds every bundle it must rewrite."""
    path = _exports_file()
    known = _exports()
    dirs = known.get(palace, [])
    where = str(Path(out).resolve())
    if where not in dirs:
        known[palace] = [*dirs, where]
        atomic_write(path, orjson.dumps(known, option=orjson.OPT_INDENT_2))


def _exports() -> dict[str, list[str]]:
    try:
        known = orjson.loads(_exports_file().read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return known if isinstance(known, dict) else {}


def exported_to(palace: str) -> list[str]:
    """The bundle directories ``palace`` was exported to from this machine."""
    return [d for d in _exports().get(palace, []) if isinstance(d, str)]


def check_openable(out: Path, keys: Keys | None, rewrite: bool) -> None:
    """Refuse, before anything is changed, a bundle directory whose bundles these keys cannot open
    (or, with ``rewrite``, cannot re-encrypt: a passphrase bundle needs the passphrase)."""
    for link in list_bundles(out):
        outer = Manifest.load(link)
        if not outer.sealed:
            continue
        if keys is None:
            raise CryptError(f"open bundle {link}: it is encrypted", hint="pass --identity FILE or --passphrase-file FILE")
        if rewrite and outer.encryption and outer.encryption.get("passphrase") and keys.passphrase is None:
            raise CryptError(f"rewrite bundle {link}: it is passphrase-encrypted, and so must its new files be",
                             hint="pass --passphrase-file FILE")
        with scratch.scratch(scratch.DECRYPTED) as tmp:
            keys.decrypt(link / SEALED_MANIFEST, Path(tmp) / MANIFEST, keys.for_bundle(link), link)

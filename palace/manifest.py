"""The bundle manifest: what a bundle holds and how to check it.

A manifest is never trusted as written. ``Manifest.load`` validates it against the schema below
(types, a name that matches its directory and its kind, a ``previous`` that is a sibling bundle's
name, file paths confined to the bundle and drawn from the files a bundle can hold, a cosine
collection space), and ``check_files`` refuses a file the manifest does not list, a listed file
that is missing or differs from its sha256, and row counts that differ from the manifest's.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .crypt import KEY_FILE
from .errors import PalaceEtlError
from .hashed import HashRecord
from .ids import sha256_file

BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
NAME_RE = re.compile(r"palace-(\d{8}T\d{12}Z)-(full|incr)")
KINDS = {"full": "full", "incremental": "incr"}
TABLE_FILES = ("drawers", "closets", "entities", "triples", "state", "tombstones")
SIDECAR_FILE = "sidecars/mempalace_embedder.json"
ALLOWED_FILES = {f"{t}.parquet" for t in TABLE_FILES} | {SIDECAR_FILE}
REQUIRED_FILES = ("state.parquet", "tombstones.parquet")
SEALED = ".age"  # an encrypted bundle's files: each plaintext file's name + .age (palace.crypt)
SEALED_MANIFEST = MANIFEST + SEALED  # the whole manifest, encrypted; the plain one keeps only checksums
SEALED_FILES = {f + SEALED for f in ALLOWED_FILES} | {SEALED_MANIFEST, KEY_FILE}
REQUIRED_SEALED = (*(f + SEALED for f in REQUIRED_FILES), SEALED_MANIFEST)
# collection settings a restore may apply: MemPalace reads similarity as 1 - cosine distance
COLLECTION_KEYS = {"hnsw:space": ("cosine",), "hnsw:num_threads": range(1, 65),
                   "hnsw:batch_size": range(1, 1_000_001), "hnsw:sync_threshold": range(1, 1_000_001)}
MAX_MANIFEST_BYTES = 16 << 20


def bundle_name(when: dt.datetime, incremental: bool) -> str:
    """The one spelling of a bundle directory's name: ``palace-<UTC stamp>-<full|incr>``."""
    return f"palace-{when.astimezone(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}-{'incr' if incremental else 'full'}"


def bundle_time(name: str) -> dt.datetime:
    """When a bundle was written, read from its name (naive UTC)."""
    m = NAME_RE.fullmatch(name)
    if not m:
        raise BundleError(f"read bundle {name}: not a bundle name")
    return dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S%fZ")


class BundleError(PalaceEtlError):
    """A bundle is missing, corrupt or does not chain."""


@dataclass
class Manifest:
    name: str
    kind: str  # "full" | "incremental"
    created_at: str
    palace: str
    embedder: dict | None
    collections: dict  # name -> collection metadata (hnsw settings) for restore
    counts: dict = field(default_factory=dict)  # table -> rows written in this bundle
    totals: dict = field(default_factory=dict)  # table -> rows in the palace at export time
    files: dict = field(default_factory=dict)  # relative path -> sha256
    previous: str | None = None  # the bundle this incremental builds on
    watermark: dict = field(default_factory=dict)
    schema_version: int = BUNDLE_SCHEMA_VERSION
    encryption: dict | None = None  # {scheme: age, passphrase: bool[, recipients]} (palace.crypt)
    wing: str | None = None  # a bundle of one wing's drawers and closets only (no KG)
    sizes: dict = field(default_factory=dict)  # relative path -> bytes (checked before the sha256)

    @property
    def sealed(self) -> bool:
        """The outer manifest of an encrypted bundle: it lists only ciphertext files."""
        return SEALED_MANIFEST in self.files

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def load(cls, bundle: Path, dirname: str | None = None) -> "Manifest":
        """Read and validate ``bundle``'s manifest; its name must be ``dirname`` (default: the
        bundle directory's own name)."""
        bundle = Path(bundle)
        path = bundle / MANIFEST
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise BundleError(f"read bundle {bundle}: {MANIFEST} is not a regular file")
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise BundleError(f"read bundle {bundle}: {MANIFEST} is larger than any manifest")
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise BundleError(f"read bundle {bundle}: no {MANIFEST}") from None
        except orjson.JSONDecodeError as exc:
            raise BundleError(f"read bundle {bundle}: {MANIFEST} is not valid JSON ({exc})") from None
        problems = schema_problems(data, dirname or bundle.name)
        if problems:
            raise BundleError(f"read bundle {bundle}: {MANIFEST} is not a valid manifest: " + "; ".join(problems),
                              hint="the bundle is damaged: use another bundle, or export again")
        return cls(**data)


def _is_count_map(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and type(n) is int and n >= 0 for k, n in v.items())


def _safe_rel(rel: str, allowed: set[str]) -> bool:
    p = PurePosixPath(rel)
    return (isinstance(rel, str) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel
            and "\x00" not in rel and str(p) == rel and rel in allowed)


def schema_problems(data, dirname: str) -> list[str]:
    """Everything wrong with a manifest's JSON, checked before any field is used."""
    if not isinstance(data, dict):
        return ["not a JSON object"]
    if data.get("schema_version") != BUNDLE_SCHEMA_VERSION:
        return [f"schema version {data.get('schema_version')!r} is not {BUNDLE_SCHEMA_VERSION}"]
    known = set(Manifest.__dataclass_fields__)
    problems = [f"unknown field {k!r}" for k in sorted(set(data) - known)]
    problems += [f"missing field {k!r}" for k in ("name", "kind", "created_at", "palace", "embedder", "collections")
                 if k not in data]
    if problems:
        return problems
    name, kind, prev = data["name"], data["kind"], data.get("previous")
    m = NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if not m:
        problems.append(f"name {name!r} is not a bundle name")
    elif name != dirname:
        problems.append(f"name {name!r} is not its directory's name {dirname!r}")
    if kind not in KINDS:
        problems.append(f"kind {kind!r} is neither full nor incremental")
    elif m and KINDS[kind] != m.group(2):
        problems.append(f"kind {kind!r} does not match the name {name!r}")
    if kind == "full" and prev is not None:
        problems.append("a full bundle names a previous bundle")
    if kind == "incremental" and not (isinstance(prev, str) and NAME_RE.fullmatch(prev) and prev != name):
        problems.append(f"previous {prev!r} is not another bundle's name")
    for key in ("created_at", "palace"):
        if not isinstance(data[key], str):
            problems.append(f"{key} is not text")
    emb = data["embedder"]
    if emb is not None and not (isinstance(emb, dict) and isinstance(emb.get("model_name"), str)
                                and type(emb.get("dimension")) is int and emb["dimension"] >= 0):
        problems.append("embedder is not {model_name, dimension}")
    cols = data["collections"]
    if not isinstance(cols, dict):
        problems.append("collections is not an object")
    else:
        for table, meta in cols.items():
            if table not in ("drawers", "closets") or not isinstance(meta, dict):
                problems.append(f"collection {table!r} is not drawers or closets settings")
                continue
            for k, v in meta.items():
                allowed = COLLECTION_KEYS.get(k)
                if allowed is None or isinstance(v, bool) or v not in allowed:
                    problems.append(f"collection {table} setting {k}={v!r} is not allowed")
    for key in ("counts", "totals", "sizes"):
        if not _is_count_map(data.get(key, {})):
            problems.append(f"{key} is not a map of table to row count")
    files = data.get("files", {})
    if not isinstance(files, dict):
        problems.append("files is not an object")
    else:
        sealed = SEALED_MANIFEST in files
        allowed, required = (SEALED_FILES, REQUIRED_SEALED) if sealed else (ALLOWED_FILES, REQUIRED_FILES)
        for rel, digest in files.items():
            if not _safe_rel(rel, allowed):
                problems.append(f"file {rel!r} is not one a{'n encrypted' if sealed else ''} bundle holds "
                                "(paths stay inside the bundle)")
            if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                problems.append(f"file {rel!r} has no sha256")
        problems += [f"required file {f} is not listed" for f in required if f not in files]
        if isinstance(data.get("sizes"), dict) and set(data["sizes"]) - set(files):
            problems.append("sizes names a file the manifest does not list")
        if sealed and (data.get("counts") or data.get("totals") or data["embedder"] or data.get("wing")):
            problems.append("an encrypted bundle's plain manifest holds counts, totals, an embedder or a wing")
    enc = data.get("encryption")
    if enc is not None and not (isinstance(enc, dict) and enc.get("scheme") == "age"
                                and isinstance(enc.get("passphrase"), bool)
                                and all(isinstance(r, str) for r in enc.get("recipients", []))
                                and set(enc) <= {"scheme", "passphrase", "recipients"}):
        problems.append("encryption is not {scheme: age, passphrase, recipients}")
    if data.get("wing") is not None and not (isinstance(data["wing"], str) and data["wing"]):
        problems.append("wing is not a wing name")
    if not isinstance(data.get("watermark", {}), dict):
        problems.append("watermark is not an object")
    return problems


def parquet_rows(path: Path) -> int:
    with pq.ParquetFile(path) as pf:
        return pf.metadata.num_rows


def read_parquet(path: Path, columns: list[str] | None = None, read_dictionary: list[str] | None = None) -> pa.Table:
    """One Parquet file, whole or some columns. Not ``pq.read_table``: for one file it goes through
    the dataset layer, whose first import (with the compute kernels) costs more than reading a
    100k-row state file."""
    with pq.ParquetFile(path, read_dictionary=read_dictionary) as pf:
        return pf.read(columns=columns)


def check_files(bundle: Path, manifest: Manifest, hashes: HashRecord | None = None) -> list[str]:
    """Every problem with the bundle's files: unlisted, missing, not a regular file, a sha256 that
    differs from the manifest, or row counts that differ from the manifest's counts and totals.
    With ``hashes``, a file this machine hashed before and that has not changed since is not re-read."""
    bundle = Path(bundle)
    problems = []
    present = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if not p.is_dir() or p.is_symlink()}
    for rel in sorted(present - set(manifest.files) - {MANIFEST}):
        problems.append(f"{bundle / rel}: not listed in the manifest (refusing to use an unverified file)")
    for rel, digest in sorted(manifest.files.items()):
        path = bundle / rel
        if path.is_symlink() or (path.exists() and not path.is_file()):
            problems.append(f"{path}: not a regular file")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif rel in manifest.sizes and path.stat().st_size != manifest.sizes[rel]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {manifest.sizes[rel]} (truncated "
                            "or changed)")
        elif (hashes.sha256(path, digest) if hashes else sha256_file(path)) != digest:
            problems.append(f"{path}: sha256 mismatch with {MANIFEST} (the file or the manifest is corrupt or changed)")
    if problems or manifest.sealed:  # an encrypted bundle's rows are checked once decrypted
        return problems
    try:
        for table, n in sorted(manifest.counts.items()):
            rel = f"{table}.parquet"
            got = parquet_rows(bundle / rel) if rel in manifest.files else 0
            if got != n:
                problems.append(f"{bundle / rel}: {got} rows, manifest says {n}")
        tables = read_parquet(bundle / "state.parquet", ["table"], ["table"]).column("table").combine_chunks()
        if tables.null_count:
            problems.append(f"{bundle / 'state.parquet'}: {tables.null_count} rows without a table")
        counts = np.bincount(tables.indices.to_numpy(zero_copy_only=False), minlength=len(tables.dictionary))
        per_table = dict(zip(tables.dictionary.to_pylist(), counts.tolist()))
        for table, n in sorted(manifest.totals.items()):
            if per_table.get(table, 0) != n:
                problems.append(f"{bundle / 'state.parquet'}: {per_table.get(table, 0)} {table} rows, "
                                f"manifest totals say {n}")
    except Exception as exc:  # a listed file whose sha matched but is not Parquet: written broken
        problems.append(f"{bundle}: unreadable table ({type(exc).__name__}: {exc})")
    return problems

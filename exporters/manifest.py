"""The bundle manifest: what a bundle holds and how to check it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from etl.errors import PalaceEtlError
from etl.ids import sha256_file

BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


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

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def load(cls, bundle: Path) -> "Manifest":
        path = Path(bundle) / MANIFEST
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise BundleError(f"read bundle {bundle}: no {MANIFEST}") from None
        except orjson.JSONDecodeError as exc:
            raise BundleError(f"read bundle {bundle}: {MANIFEST} is not valid JSON ({exc})") from None
        if data.get("schema_version") != BUNDLE_SCHEMA_VERSION:
            raise BundleError(f"read bundle {bundle}: schema version {data.get('schema_version')} is not "
                              f"{BUNDLE_SCHEMA_VERSION}")
        return cls(**data)


def check_files(bundle: Path, manifest: Manifest) -> list[str]:
    """Every problem with the bundle's files: missing, or a sha256 that differs from the manifest."""
    problems = []
    for rel, digest in sorted(manifest.files.items()):
        path = Path(bundle) / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 mismatch (corrupt or changed)")
    return problems

"""Open any palace by the spelling a user gives it (as Litestream opens replica URLs):

- ``bundle:DIR``, or a directory holding bundles -> ``BundleDirStore``
- ``http://host:port`` / ``https://...`` -> ``ChromaServerStore`` (needs ``--kg``)
- any other directory (holding ``chroma.sqlite3``, or new) -> ``ChromaDirStore``

A new backend is one module here, one branch in ``store_kind``, and a green
``tests/test_store_contract.py``.
"""
from __future__ import annotations

from pathlib import Path

from ..bundles import list_bundles
from ..errors import PalaceEtlError
from ..layout import CHROMA_DB, PalaceLayout, layout_for
from .base import CollectionInfo, PalaceStore, SyncState
from .bundle_dir import BundleDirStore
from .chroma_dir import ChromaDirReader, ChromaDirStore
from .chroma_http import ChromaServerStore

__all__ = ["BundleDirStore", "ChromaDirReader", "ChromaDirStore", "ChromaServerStore", "CollectionInfo", "PalaceStore", "SyncState",
           "open_store", "store_for", "store_kind", "store_root"]


def store_kind(spec: str) -> str:
    """``chroma``, ``chroma-server`` or ``bundle``, from an explicit scheme or one unambiguous marker.

    ``bundle:DIR`` and ``http(s)://`` say it outright. A directory is a palace when it holds
    ``chroma.sqlite3`` and a bundle directory when it holds bundles (or a bundle replica's sync
    state); both at once (a bundle exported into the palace) is refused as ambiguous. A new or empty
    directory is a palace."""
    spec = str(spec)
    if spec.startswith("bundle:"):
        return "bundle"
    if spec.startswith(("http://", "https://")):
        return "chroma-server"
    path = Path(spec).expanduser()
    is_palace = (path / CHROMA_DB).exists()
    is_bundles = path.is_dir() and (bool(list_bundles(path)) or (path / ".sync-state.json").exists())
    if is_palace and is_bundles:
        raise PalaceEtlError(f"open replica {spec}: it holds both a palace (chroma.sqlite3) and bundles; "
                             "which one is meant?", hint=f"say bundle:{spec} for the bundles, or move them out "
                             "of the palace directory")
    return "bundle" if is_bundles else "chroma"


def store_root(spec: str) -> str:
    """What a store is, whatever spelling names it (for refusing a sync of a replica with itself)."""
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        return spec.rstrip("/")
    return str(Path(spec.removeprefix("bundle:")).expanduser().resolve())


def store_for(layout: PalaceLayout, lock_timeout: float = 30.0, settings: dict | None = None,
              read_only: bool = False) -> PalaceStore:
    """The Chroma store of a palace layout (a directory, or a server with its KG file). ``read_only``
    gives a directory's lock-free reader (``ChromaDirReader``): what export, verify and status use,
    so they work beside a MemPalace server holding the palace's lease."""
    if layout.is_server:
        return ChromaServerStore(layout, lock_timeout, settings)
    return (ChromaDirReader if read_only else ChromaDirStore)(layout, lock_timeout, settings)


def open_store(spec: str, kg: str | Path | None = None, lock_timeout: float = 30.0,
               read_only: bool = False) -> PalaceStore:
    if store_kind(spec) == "bundle":
        return BundleDirStore(Path(str(spec).removeprefix("bundle:")).expanduser())
    return store_for(layout_for(spec, kg), lock_timeout, read_only=read_only)

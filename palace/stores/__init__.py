"""Open any palace by the spelling a user gives it (as Litestream opens replica URLs):

- ``bundle:DIR``, or a directory holding bundles -> ``BundleDirStore``; one bundle's directory
  -> that point of the chain, read-only
- ``http://host:port`` / ``https://...`` -> ``ChromaServerStore`` (needs ``--kg``)
- ``pgvector:DIR``, or a directory holding ``pgvector_backend.json``, or a new one MemPalace's own
  backend choice puts on pgvector (``palace.stores.backend``) -> ``PgVectorStore``
- ``chroma:DIR``, or any other directory (holding ``chroma.sqlite3``, or new) -> ``ChromaDirStore``

A new backend is one module here, one branch in ``store_kind``, and a green
``tests/test_store_contract.py``.

Writers open through ``open_writer``, which looks first at who holds a palace directory's writer
lease (``palace.live``) and picks the route: direct (our ids, metadata and vectors, under the lock),
through a live MemPalace hub or daemon (``RoutedStore``), or none at once when the holder is a
MemPalace server that cannot be reached.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..bundles import list_bundles
from ..crypt import Keys
from ..errors import PalaceEtlError, PalaceLocked
from ..layout import PalaceLayout, layout_for
from ..live import lease_holder, live_daemon, live_hub
from ..manifest import MANIFEST, NAME_RE
from .backend import MARKERS, palace_backend
from .base import CollectionInfo, PalaceStore, SyncState
from .bundle_dir import BundleDirStore
from .chroma_dir import ChromaDirReader, ChromaDirStore
from .chroma_http import ChromaServerStore
from .pgvector import PgSettings, PgVectorStore
from .routed import RoutedIds, RoutedStore

__all__ = ["VIA", "BundleDirStore", "ChromaDirReader", "ChromaDirStore", "ChromaServerStore", "CollectionInfo",
           "PalaceStore", "PgVectorStore", "RoutedIds", "RoutedStore", "SyncState", "open_store", "open_writer", "split_spec", "store_for",
           "store_kind", "store_root"]

VIA = ("auto", "hub", "daemon", "direct")
WAIT_POLL = 1.0  # seconds between looks at the lease while --wait waits


EXPLICIT = ("chroma:", "pgvector:")  # a palace directory with its backend named, as MemPalace's --backend


def split_spec(spec: str) -> tuple[str | None, str]:
    """(the backend a ``chroma:``/``pgvector:`` prefix names, or None; the rest of the spelling)."""
    spec = str(spec)
    for prefix in EXPLICIT:
        if spec.startswith(prefix):
            return prefix[:-1], spec[len(prefix):]
    return None, spec


def store_kind(spec: str) -> str:
    """``chroma``, ``pgvector``, ``chroma-server`` or ``bundle``, from an explicit scheme or one
    unambiguous marker.

    ``bundle:DIR``, ``pgvector:DIR``, ``chroma:DIR`` and ``http(s)://`` say it outright (a named
    backend that is not what the directory holds is refused). A directory is a palace when it holds
    ``chroma.sqlite3`` or ``pgvector_backend.json`` and a bundle directory when it holds bundles (or
    a bundle replica's sync state); both at once (a bundle exported into the palace) is refused as
    ambiguous. A new or empty directory gets the backend MemPalace would choose for it."""
    explicit, spec = split_spec(spec)
    if spec.startswith("bundle:"):
        return "bundle"
    if spec.startswith(("http://", "https://")):
        return "chroma-server"
    path = Path(spec).expanduser()
    if explicit is None and bundle_point(path) is not None:
        return "bundle"
    is_palace = any((path / marker).exists() for marker in MARKERS.values())
    is_bundles = explicit is None and path.is_dir() and (
        bool(list_bundles(path)) or (path / ".sync-state.json").exists())
    if is_palace and is_bundles:
        raise PalaceEtlError(f"open replica {spec}: it holds both a palace and bundles; "
                             "which one is meant?", hint=f"say bundle:{spec} for the bundles, or move them out "
                             "of the palace directory")
    return "bundle" if is_bundles else palace_backend(path, explicit)


def bundle_point(path: Path) -> tuple[Path, str] | None:
    """(bundle directory, bundle name) when ``path`` is one bundle (``.../palace-<stamp>-full``)."""
    path = Path(path)
    if NAME_RE.fullmatch(path.name) and path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file():
        return path.parent, path.name
    return None


def store_root(spec: str) -> str:
    """What a store is, whatever spelling names it (for refusing a sync of a replica with itself)."""
    spec = split_spec(spec)[1]
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
               read_only: bool = False, keys: Keys | None = None) -> PalaceStore:
    """The store ``spec`` names; ``keys`` open an encrypted bundle directory. One bundle's own
    directory names that point of its chain (read-only)."""
    kind, path = store_kind(spec), split_spec(spec)[1]
    if kind == "bundle":
        where = Path(path.removeprefix("bundle:")).expanduser()
        point = bundle_point(where)
        return BundleDirStore(point[0], keys, point[1]) if point else BundleDirStore(where, keys)
    if kind == "pgvector":  # read or written alike: PostgreSQL's MVCC keeps readers and writers apart
        return PgVectorStore(Path(path).expanduser(), PgSettings.from_environment(), kg)
    return store_for(layout_for(path, kg), lock_timeout, read_only=read_only)


def open_writer(spec: str, kg: str | Path | None = None, lock_timeout: float = 30.0, via: str = "auto",
                wait: bool = False, what: str = "import", routable: bool = True,
                notify: Callable[[str], None] | None = None, keys: Keys | None = None) -> PalaceStore:
    """The store to write ``spec`` through, beside whatever MemPalace process holds its lease.

    - nobody holds it (or ``via="direct"``): the direct store, our ids, metadata and vectors;
    - ``wait``: first wait (``notify`` is told whom for) until nobody holds it, then direct;
    - a live, writable MemPalace hub or daemon holds it and the verb can go through one
      (``routable``): ``RoutedStore``; ``via="hub"``/``"daemon"`` insists on that route;
    - a MemPalace server that cannot be reached (a stdio ``mempalace-mcp``) or one the verb cannot
      write through: ``PalaceLocked`` at once, naming it and the ways out;
    - any other holder (``mempalace mine``, another palace-etl): the direct store, whose writes wait
      up to ``lock_timeout`` for it, as before.
    """
    if via not in VIA:
        raise PalaceEtlError(f"--via {via!r}: expected one of {', '.join(VIA)}")
    if store_kind(spec) != "chroma":
        if via in ("hub", "daemon"):
            raise PalaceEtlError(f"{what} {spec}: --via {via} is for a palace directory MemPalace serves")
        return open_store(spec, kg, lock_timeout, keys=keys)
    layout = layout_for(split_spec(spec)[1], kg)
    palace = layout.path
    holder = lease_holder(palace)
    if wait and holder is not None:
        if notify is not None:
            notify(f"{what} {palace}: waiting for {holder} to release the palace's writer lease")
        while (holder := lease_holder(palace)) is not None:
            time.sleep(WAIT_POLL)
    if via == "direct" or (holder is None and via == "auto"):
        return ChromaDirStore(layout, lock_timeout)
    servers = [s for s in (live_hub(palace), live_daemon(palace)) if s is not None and not s.read_only]
    usable = [s for s in servers if via in ("auto", s.kind)]
    if usable and routable:
        return RoutedStore(layout, usable[0], lock_timeout)
    if via != "auto":
        raise PalaceEtlError(f"{what} {palace}: --via {via}, but no writable MemPalace {via} serves this palace",
                             hint=f"start one (mempalace serve --palace {palace}), or leave out --via" if via == "hub"
                             else "start it (mempalace daemon start), or leave out --via")
    if servers:  # from here on the route is auto and somebody holds the lease
        raise PalaceLocked(f"{what} {palace}: {servers[0]} holds the palace's writer lease, and a {what} carries "
                           f"ids and vectors that MemPalace's tools cannot take",
                           hint=f"stop it for the {what} window (re-run with --wait to start the moment it "
                                "stops), or serve the palace from PostgreSQL (MemPalace's pgvector backend takes "
                                "no lease)")
    if holder.is_server:
        raise PalaceLocked(f"{what} {palace}: the MemPalace server {holder} holds the palace's writer lease and "
                           "palace-etl cannot reach it to write through it",
                           hint=f"serve the palace with `mempalace serve --palace {palace}` instead (palace-etl "
                                "then writes through the hub), or stop that server for the window (re-run with "
                                "--wait to start the moment it exits), or serve the palace from PostgreSQL "
                                "(MemPalace's pgvector backend takes no lease)")
    return ChromaDirStore(layout, lock_timeout)

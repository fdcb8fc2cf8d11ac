"""Where a palace's parts live, and the files MemPalace reads beside Chroma.

A palace target is either a local directory (embedded Chroma) or a
``http://host:port`` URL of a ``chroma run`` server. The knowledge graph is
``<palace>/knowledge_graph.sqlite3`` unless ``--kg`` points elsewhere; our own
bookkeeping (run ledger, quarantine) lives in ``<palace>/.palace-etl/``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import orjson

from .errors import DiskFull, PalaceEtlError
from .identity import EmbedderIdentity

DRAWERS_COLLECTION = "mempalace_drawers"
CLOSETS_COLLECTION = "mempalace_closets"
KG_FILENAME = "knowledge_graph.sqlite3"
CHROMA_DB = "chroma.sqlite3"
SIDECAR = "mempalace_embedder.json"
STATE_DIRNAME = ".palace-etl"
ROUTED_FILE = "routed.sqlite3"  # in STATE_DIRNAME: drawers written through MemPalace (palace.stores.routed)

# MemPalace 3.11 `_hnsw_creation_metadata`: cosine space, one HNSW thread,
# batch/sync thresholds 100/1000.
HNSW_METADATA = {
    "hnsw:space": "cosine",
    "hnsw:num_threads": 1,
    "hnsw:batch_size": 100,
    "hnsw:sync_threshold": 1000,
}


@dataclass(frozen=True)
class PalaceLayout:
    location: str  # directory path or server URL
    kg_path: Path
    state_dir: Path
    private: bool = False  # a copy or build directory only this process knows: no writer lock for it

    @property
    def is_server(self) -> bool:
        return is_server_url(self.location)

    @property
    def path(self) -> Path:
        if self.is_server:
            raise ValueError("a server palace has no local directory")
        return Path(self.location)

    @property
    def sidecar_dir(self) -> Path:
        """Where ``mempalace_embedder.json`` lives: the palace, or beside the KG of a server palace."""
        return self.kg_path.parent if self.is_server else self.path


def is_server_url(location: str) -> bool:
    return urlparse(str(location)).scheme in ("http", "https")


def layout_for(location: str | os.PathLike, kg: str | os.PathLike | None = None,
               state_dir: str | os.PathLike | None = None, private: bool = False) -> PalaceLayout:
    loc = str(location)
    if is_server_url(loc):
        if kg is None:
            raise PalaceEtlError(f"open palace {loc}: a server palace needs --kg PATH for its knowledge graph",
                                 hint="keep the KG file next to the server's data, e.g. --kg /srv/palace/"
                                      "knowledge_graph.sqlite3")
        kg_path = Path(kg).expanduser().resolve()
        return PalaceLayout(loc, kg_path, Path(state_dir) if state_dir else kg_path.parent / STATE_DIRNAME)
    path = Path(loc).expanduser().resolve()
    kg_path = Path(kg).expanduser().resolve() if kg else path / KG_FILENAME
    return PalaceLayout(str(path), kg_path, Path(state_dir) if state_dir else path / STATE_DIRNAME, private)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path, tmp_prefix: str, replace: bool = False) -> Iterator[Path]:
    """A directory that appears at ``final`` whole or not at all. Yields a fresh private (0700) temp
    directory beside it to fill; on a clean exit every file in it and the directory itself are
    fsynced and it is renamed to ``final`` (with ``replace``, a directory already there is renamed
    aside first and removed only once the new one is in place; the caller checked it is ours). On
    any error the temp directory is removed and ``final`` is untouched."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=final.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        old = None
        if replace and final.is_dir() and any(final.iterdir()):
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
        elif replace and final.is_dir():
            final.rmdir()
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_dir(out: Path) -> Path:
    """Create (or accept) a directory to write into, refusing one reached through a symlink."""
    out = Path(out)
    for p in [out, *out.parents]:
        if p.is_symlink():
            raise PalaceEtlError(f"write to {out}: {p} is a symlink; refusing to write through it")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    return out


def read_sidecar(palace: Path, collection: str = DRAWERS_COLLECTION) -> EmbedderIdentity | None:
    """The embedder identity MemPalace 3.11 recorded for ``collection``, or None."""
    path = Path(palace) / SIDECAR
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    entry = data.get(collection) if isinstance(data, dict) else None
    if not isinstance(entry, dict) or not entry.get("model_name"):
        return None
    return EmbedderIdentity(str(entry["model_name"]), int(entry.get("dimension") or 0))


def write_sidecar(palace: Path, identity: EmbedderIdentity,
                  collections: tuple[str, ...] = (DRAWERS_COLLECTION, CLOSETS_COLLECTION)) -> None:
    """Record ``identity`` for ``collections``, keeping other entries (MemPalace's format, 0600, atomic)."""
    path = Path(palace) / SIDECAR
    data: dict = {}
    try:
        loaded = orjson.loads(path.read_bytes())
        data = loaded if isinstance(loaded, dict) else {}
    except (OSError, orjson.JSONDecodeError):
        pass
    for name in collections:
        data[name] = {"model_name": identity.model_name, "dimension": identity.dimension}
    atomic_write(path, orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def private_dir(path: Path) -> Path:
    """Create (or accept) a directory of our own bookkeeping: mode 0700, never a symlink.

    A planted symlink at ``.palace-etl`` or ``quarantine`` would move user records outside the
    palace; it is refused, not followed."""
    path = Path(path)
    if path.is_symlink():
        raise PalaceEtlError(f"open {path}: it is a symlink; refusing to write through it",
                             hint=f"remove the link (palace-etl creates {path.name} itself)")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.is_dir():
        raise PalaceEtlError(f"open {path}: not a directory")
    os.chmod(path, 0o700)
    return path


def open_private(path: Path, append: bool = True):
    """Open a file of ours for writing (appending, or from empty): created 0600, never through a
    symlink (``O_NOFOLLOW``)."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
             | (os.O_APPEND if append else os.O_TRUNC))
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise PalaceEtlError(f"open {path}: {exc.strerror} (a symlink there is refused)") from None
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab" if append else "wb")


SPACE_MARGIN = 16 << 20  # never let a write take the disk below this


def ensure_space(path: Path, need: int, what: str) -> None:
    """Refuse to start a write that could run the disk holding ``path`` out of space. A write cut
    off by a full disk can leave Chroma's index files half written (a 0-byte
    ``index_metadata.pickle``); stopping before it keeps the palace whole and the run resumable."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + SPACE_MARGIN:
        raise DiskFull(f"{what}: {free >> 20} MB free on the disk holding {path}, need about "
                       f"{(need + SPACE_MARGIN) >> 20} MB; stopped before writing")

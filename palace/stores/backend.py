"""Which backend a palace directory is, chosen exactly as MemPalace 3.11 chooses it
(``mempalace/palace/backend.py``), so the same environment drives MemPalace and palace-etl:

1. an explicit choice (``--backend``, or ``MEMPALACE_BACKEND_EXPLICIT``);
2. ``backend`` in MemPalace's ``config.json``, only when its ``palace_path`` is this palace;
3. ``MEMPALACE_BACKEND``;
4. what is on disk (``chroma.sqlite3`` or ``pgvector_backend.json``);
5. chroma.

A directory holding both backends' files, or the files of another backend than the one chosen, is
refused (MemPalace raises ``BackendMismatchError`` there too).
"""
from __future__ import annotations

import os
from pathlib import Path

import orjson

from ..errors import PalaceEtlError
from ..layout import CHROMA_DB

BACKENDS = ("chroma", "pgvector")
MARKERS = {"chroma": CHROMA_DB, "pgvector": "pgvector_backend.json"}


def mempalace_config_dir() -> Path:
    """MemPalace's config directory: ``MEMPALACE_CONFIG_DIR``, a legacy ``~/.mempalace`` install,
    ``$XDG_CONFIG_HOME/mempalace``, ``~/.config/mempalace``."""
    env = (os.environ.get("MEMPALACE_CONFIG_DIR") or "").strip()
    if env:
        return Path(env).expanduser()
    legacy = Path.home() / ".mempalace"
    if legacy.is_dir() and (any((legacy / m).is_file() for m in ("config.json", "people_map.json"))
                            or (legacy / "palace" / CHROMA_DB).is_file()):
        return legacy
    xdg = (os.environ.get("XDG_CONFIG_HOME") or "").strip()
    if xdg and Path(xdg).expanduser().is_absolute():
        return Path(xdg).expanduser() / "mempalace"
    return Path.home() / ".config" / "mempalace"


def mempalace_config() -> dict:
    """MemPalace's ``config.json`` ({} when absent or unreadable, as MemPalace treats it)."""
    try:
        data = orjson.loads((mempalace_config_dir() / "config.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _configured_palace(cfg: dict) -> str:
    env = os.environ.get("MEMPALACE_PALACE_PATH") or os.environ.get("MEMPALACE_PALACE") or \
        os.environ.get("MEMPAL_PALACE_PATH")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.abspath(os.path.expanduser(str(cfg.get("palace_path") or mempalace_config_dir() / "palace")))


def chosen_backend(path: str | os.PathLike, explicit: str | None = None) -> str | None:
    """The backend chosen for ``path`` by flag, config or environment (steps 1-3), or None."""
    explicit = explicit or os.environ.get("MEMPALACE_BACKEND_EXPLICIT")
    cfg = mempalace_config()
    configured = cfg.get("backend") if _configured_palace(cfg) == os.path.abspath(os.path.expanduser(str(path))) \
        else None
    value = explicit or configured or os.environ.get("MEMPALACE_BACKEND")
    if not value:
        return None
    value = str(value).strip().lower()
    if value not in BACKENDS:
        raise PalaceEtlError(f"open palace {path}: backend {value!r} is not one palace-etl writes "
                             f"({', '.join(BACKENDS)})", hint="unset MEMPALACE_BACKEND, or choose chroma or pgvector")
    return value


def palace_backend(path: str | os.PathLike, explicit: str | None = None) -> str:
    """The backend of a palace directory (steps 1-5), refusing mixed or mismatched files."""
    path = Path(path).expanduser()
    found = [b for b, marker in MARKERS.items() if (path / marker).exists()]
    if len(found) > 1:
        raise PalaceEtlError(f"open palace {path}: it holds the files of two backends ({', '.join(found)})",
                             hint="keep one palace per directory")
    chosen = chosen_backend(path, explicit)
    if chosen and found and found[0] != chosen:
        raise PalaceEtlError(f"open palace {path}: it holds a {found[0]} palace, but {chosen} was chosen "
                             "(MEMPALACE_BACKEND, MemPalace's config.json or --backend)",
                             hint=f"choose {found[0]} for it, or use another directory for the {chosen} palace")
    return chosen or (found[0] if found else "chroma")

"""Exports for people rather than machines: ``<wing>/<room>.jsonl`` and a browsable markdown tree.

Both read documents and metadata through the store's ``rows`` (for a palace directory:
``chroma.sqlite3`` read-only in rowid pages; no vectors, no Chroma client). Output is deterministic: rows sorted by id,
keys sorted.

The export is built in a fresh temp directory beside ``--out`` and renamed into place.
``--out`` is replaced only when it is empty or an earlier palace-etl export of the same
format (it carries ``.palace-etl-export.json``): anything else is refused, never deleted.
Wing and room names become file names only through ``safe_component``, so a name such as
``../../x`` or ``/abs`` cannot write outside ``--out``.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import quote

import orjson

from palace.errors import PalaceEtlError, SourceMissing
from palace.layout import atomic_dir, safe_dir
from palace.stores import PalaceStore

MARKER = ".palace-etl-export.json"  # what tells a directory is an earlier human export of ours
NAME_MAX = 96  # characters of a wing or room kept in a file name (a hash keeps long names distinct)
_UNSAFE = re.compile(r"[^\w .,+=@-]", re.UNICODE)


def safe_component(name: str, empty: str) -> str:
    """A file-name-safe, unique stand-in for a wing or room: never a path separator, NUL, ``.``/``..``,
    a leading dot or an over-long name. A name that had to change gets a short hash of the original,
    so two wings never land in one file."""
    cleaned = _UNSAFE.sub("_", name).strip(" .")[:NAME_MAX]
    if cleaned == name and name:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned or empty}~{digest}"


def _room_file(root: Path, wing: str, room: str, suffix: str) -> Path:
    d = root / safe_component(wing, "_no_wing")
    d.mkdir(exist_ok=True, mode=0o700)
    return d / f"{safe_component(room, '_no_room')}{suffix}"


def _check_out(store: PalaceStore, out: Path, fmt: str) -> Path:
    """The resolved export directory; refuses anything that is not ours to replace."""
    if out.is_symlink():
        raise PalaceEtlError(f"export --out {out}: it is a symlink; refusing to write through it")
    out = out.resolve()
    root = store.root
    if root is not None and (out == root or out.is_relative_to(root) or root.is_relative_to(out)):
        raise PalaceEtlError(f"export --out {out}: it overlaps the palace {root}",
                             hint="export to a directory outside the palace")
    if out.exists() and not out.is_dir():
        raise PalaceEtlError(f"export --out {out}: it is not a directory")
    if out.is_dir() and any(out.iterdir()):
        marker_file = out / MARKER
        try:
            marker = {} if marker_file.is_symlink() else orjson.loads(marker_file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            marker = {}
        if not isinstance(marker, dict) or marker.get("format") != fmt:
            raise PalaceEtlError(f"export --out {out}: the directory is not empty and is not an earlier "
                                 f"palace-etl {fmt} export; nothing written",
                                 hint="give a new or empty directory (bundles go to --format parquet)")
    safe_dir(out.parent)
    return out


def export_human(store: PalaceStore, out: Path, fmt: str) -> dict:
    if not store.exists():
        raise SourceMissing(f"export palace {store.name}: no palace there")
    out = _check_out(store, Path(out), fmt)
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out, f".tmp-{out.name}-", replace=True) as tmp:  # an earlier export of ours is replaced
        for eid, doc, meta in (row for page in store.rows("drawers") for row in page):  # append, then sort
            wing, room = str(meta.get("wing", "")), str(meta.get("room", ""))
            counts.setdefault(wing, {}).setdefault(room, 0)
            counts[wing][room] += 1
            with open(_room_file(tmp, wing, room, ".jsonl"), "ab") as f:
                f.write(orjson.dumps({"id": eid, "document": doc, "metadata": meta},
                                     option=orjson.OPT_SORT_KEYS) + b"\n")
        for path in tmp.rglob("*.jsonl"):
            lines = sorted(path.read_bytes().splitlines(), key=lambda l: orjson.loads(l)["id"])
            if fmt == "jsonl":
                path.write_bytes(b"\n".join(lines) + b"\n")
            else:
                path.with_suffix(".md").write_text(_markdown([orjson.loads(l) for l in lines]))
                path.unlink()
        if fmt == "markdown":
            (tmp / "index.md").write_text(_index(counts))
        (tmp / MARKER).write_bytes(orjson.dumps({"format": fmt, "palace": store.name}))
        for p in tmp.rglob("*"):
            os.chmod(p, 0o600 if p.is_file() else 0o700)
    return {"out": str(out), "format": fmt, "wings": counts, "drawers": sum(sum(r.values()) for r in counts.values())}


def _md_text(s: str) -> str:
    """A name as table-safe markdown text (no pipes, newlines or NUL)."""
    return s.replace("\x00", "").replace("|", "\\|").replace("\n", " ") or "(none)"


def _markdown(rows: list[dict]) -> str:
    first = rows[0]["metadata"] if rows else {}
    parts = [f"# {_md_text(str(first.get('wing', '')))} / {_md_text(str(first.get('room', '')))}\n"]
    for r in rows:
        m = r["metadata"]
        quoted = "\n".join(f"> {line}" if line else ">" for line in (r["document"] or "").splitlines())
        parts.append(f"\n## {r['id']}\n\n{quoted}\n\n| Source | Filed | Added by |\n|---|---|---|\n"
                     f"| {m.get('source_file', '')} | {m.get('filed_at', '')} | {m.get('added_by', '')} |\n")
    return "".join(parts)


def _index(counts: dict[str, dict[str, int]]) -> str:
    lines = ["# Palace export\n", "| wing | rooms | drawers |", "|---|---|---|"]
    for wing in sorted(counts):
        rooms = ", ".join(f"[{_md_text(r)}]({quote(safe_component(wing, '_no_wing'))}/"
                          f"{quote(safe_component(r, '_no_room'))}.md)" for r in sorted(counts[wing]))
        lines.append(f"| {_md_text(wing)} | {rooms} | {sum(counts[wing].values())} |")
    return "\n".join(lines) + "\n"

"""Exports for people rather than machines: ``<wing>/<room>.jsonl`` and a browsable markdown tree.

Both read documents and metadata straight from ``chroma.sqlite3`` (read-only, rowid
pages; no vectors, no Chroma client). Output is deterministic: rows sorted by id,
keys sorted.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson

from etl.errors import SourceMissing
from palace import chroma_sqlite
from palace.layout import DRAWERS_COLLECTION, PalaceLayout
from palace.vectors import VectorStore

from .bundle import PAGE, _safe_dir


def _rows(layout: PalaceLayout):
    if layout.is_server:  # no SQLite file to read: page the server's API
        store = VectorStore(layout)
        try:
            for pos, i, d, m in store.scan():
                yield pos, i, d, m or {}
        finally:
            store.close()
        return
    with chroma_sqlite.open_ro(chroma_sqlite.palace_db(layout.path)) as conn:
        seg = chroma_sqlite.segments(conn, DRAWERS_COLLECTION).get("METADATA")
        after = 0
        while seg is not None and (page := chroma_sqlite.page_rows(conn, seg, after, PAGE)):
            yield from page
            after = page[-1][0]


def _room_file(root: Path, wing: str, room: str, suffix: str) -> Path:
    d = root / (wing or "_no_wing")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d / f"{room or '_no_room'}{suffix}"


def export_human(layout: PalaceLayout, out: Path, fmt: str) -> dict:
    if not layout.is_server and not chroma_sqlite.palace_db(layout.path).exists():
        raise SourceMissing(f"export palace {layout.path}: no chroma.sqlite3 there")
    out = Path(out)
    _safe_dir(out.parent)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    counts: dict[str, dict[str, int]] = {}
    try:
        for _, eid, doc, meta in _rows(layout):  # append, then sort each file: memory stays flat
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
                path.with_suffix(".md").write_text(_markdown(path, [orjson.loads(l) for l in lines]))
                path.unlink()
        if fmt == "markdown":
            (tmp / "index.md").write_text(_index(counts))
        for p in tmp.rglob("*"):
            os.chmod(p, 0o600 if p.is_file() else 0o700)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "format": fmt, "wings": counts, "drawers": sum(sum(r.values()) for r in counts.values())}


def _markdown(path: Path, rows: list[dict]) -> str:
    title = f"# {path.parent.name} / {path.stem}\n"
    parts = [title]
    for r in rows:
        m = r["metadata"]
        quoted = "\n".join(f"> {line}" if line else ">" for line in (r["document"] or "").splitlines())
        parts.append(f"\n## {r['id']}\n\n{quoted}\n\n| Source | Filed | Added by |\n|---|---|---|\n"
                     f"| {m.get('source_file', '')} | {m.get('filed_at', '')} | {m.get('added_by', '')} |\n")
    return "".join(parts)


def _index(counts: dict[str, dict[str, int]]) -> str:
    lines = ["# Palace export\n", "| wing | rooms | drawers |", "|---|---|---|"]
    for wing in sorted(counts):
        rooms = ", ".join(f"[{r}]({wing or '_no_wing'}/{r or '_no_room'}.md)" for r in sorted(counts[wing]))
        lines.append(f"| {wing} | {rooms} | {sum(counts[wing].values())} |")
    return "\n".join(lines) + "\n"

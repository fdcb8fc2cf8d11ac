"""First, do no harm (issue 14): each test reproduces one way palace-etl could lose data, write
where it must not, hang or crash, and pins the fix. Test names carry the item number."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from etl.embed import EmbedderIdentity
from palace.layout import layout_for, write_sidecar
from palace.vectors import VectorStore

from .helpers import cli_json, palace_rows, run_cli


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_palace(path: Path, rows: dict[str, tuple[str, dict]], seed: int = 1) -> Path:
    """A palace written by 'another tool': exactly these rows, random unit vectors."""
    ids = sorted(rows)
    store = VectorStore(layout_for(path))
    store.upsert(ids, [rows[i][0] for i in ids], [rows[i][1] for i in ids], unit(len(ids), seed))
    store.close()
    write_sidecar(path, EmbedderIdentity("random-test-vectors", 384))
    return path


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


HOSTILE = {
    "d_up": ("climbs out", {"wing": "../../x", "room": "../escape"}),
    "d_abs": ("absolute", {"wing": "/abs/path", "room": "/etc/passwd"}),
    "d_long": ("long names", {"wing": "w" * 300, "room": "r" * 300}),
    "d_nul": ("nul in name", {"wing": "nul\x00wing", "room": "a|b\nc"}),
    "d_dots": ("dots", {"wing": "..", "room": "."}),
    "d_plain": ("plain", {"wing": "work", "room": "notes"}),
    "d_plain2": ("plain again", {"wing": "work", "room": "notes"}),
}


@pytest.fixture(scope="module")
def hostile_palace(tmp_path_factory) -> Path:
    return make_palace(tmp_path_factory.mktemp("hostile") / "palace", HOSTILE)


# ------------------------------------------------------------------ item 1
@pytest.mark.parametrize("fmt", ["jsonl", "markdown"])
def test_item01_human_export_never_deletes_a_directory_it_did_not_create(hostile_palace, tmp_path, fmt):
    backups = tmp_path / "backups"
    (backups / "palace-20260101T000000000000Z-full").mkdir(parents=True)
    (backups / "palace-20260101T000000000000Z-full" / "manifest.json").write_text("{}")
    (backups / "notes.txt").write_text("mine")
    before = tree(backups)
    proc = run_cli("export", "--palace", hostile_palace, "--out", backups, "--format", fmt, check=1)
    assert "not an earlier palace-etl" in proc.stderr and tree(backups) == before
    palace_before = tree(hostile_palace)
    proc = run_cli("export", "--palace", hostile_palace, "--out", hostile_palace, "--format", fmt, check=1)
    assert "overlaps the palace" in proc.stderr and tree(hostile_palace) == palace_before
    # the parent of everything: refused, nothing gone
    run_cli("export", "--palace", hostile_palace, "--out", tmp_path, "--format", fmt, check=1)
    assert tree(backups) == before
    # an earlier export of ours is replaced; one of the other format is not
    out = tmp_path / "human"
    cli_json("export", "--palace", hostile_palace, "--out", out, "--format", fmt)
    cli_json("export", "--palace", hostile_palace, "--out", out, "--format", fmt)
    other = "markdown" if fmt == "jsonl" else "jsonl"
    run_cli("export", "--palace", hostile_palace, "--out", out, "--format", other, check=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


# ----------------------------------------------------------------- item 10
def test_item10_hostile_names_stay_inside_out_and_every_drawer_is_kept(hostile_palace, tmp_path):
    box = tmp_path / "box"  # nothing may appear outside box/out
    out = box / "out"
    box.mkdir()
    r = cli_json("export", "--palace", hostile_palace, "--out", out, "--format", "jsonl")
    assert r["drawers"] == len(HOSTILE)
    assert sorted(p.name for p in box.iterdir()) == ["out"] and not (tmp_path / "x").exists()
    ids = []
    for f in out.rglob("*.jsonl"):
        assert f.resolve().is_relative_to(out) and len(f.name.encode()) < 255
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        ids += [json.loads(line)["id"] for line in f.read_text().splitlines()]
    assert sorted(ids) == sorted(HOSTILE)
    md = box / "md"
    cli_json("export", "--palace", hostile_palace, "--out", md, "--format", "markdown")
    assert sorted(p.name for p in box.iterdir()) == ["md", "out"]
    text = "".join(f.read_text() for f in md.rglob("*.md") if f.name != "index.md")
    assert all(f"## {i}\n" in text for i in HOSTILE)  # no drawer dropped
    from urllib.parse import unquote
    import re

    links = re.findall(r"\]\(([^)]+\.md)\)", (md / "index.md").read_text())
    assert links and all((md / unquote(link)).is_file() for link in links)  # no link to a missing file


# ----------------------------------------------------------------- item 17 (human exports)
def test_item17_dot_and_symlinked_out_are_clean_errors(hostile_palace, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    proc = run_cli("export", "--palace", hostile_palace, "--out", tmp_path / "link", "--format", "jsonl", check=1)
    assert "symlink" in proc.stderr and "Traceback" not in proc.stderr and not any(real.iterdir())
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "etl.cli", "export", "--palace", str(hostile_palace), "--out", ".",
                           "--format", "markdown"], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and (work / "keep.txt").read_text() == "x"

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


# ------------------------------------------------------------------ bundles: items 2, 3, 5, 6, 8
def bundle_of(palace: Path, out: Path, *extra: str) -> Path:
    return Path(cli_json("export", "--palace", palace, "--out", out, *extra)["bundle"])


def rewrite_manifest(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def plain_palace(tmp_path_factory) -> Path:
    rows = {f"d{i:04d}": (f"memory {i}", {"wing": "w", "room": f"r{i % 3}"}) for i in range(400)}
    return make_palace(tmp_path_factory.mktemp("plain") / "palace", rows)


def test_item02_rows_deleted_during_an_export_are_recorded_not_counted(plain_palace, tmp_path, monkeypatch):
    """A writer deletes rows between the export's snapshot and its fetch (the interleaving is made
    exact by deleting right after the real snapshot is taken)."""
    import shutil

    import exporters.bundle as bundle_mod
    from exporters.bundle import export_bundle

    palace = tmp_path / "palace"
    shutil.copytree(plain_palace, palace)
    real_state = bundle_mod.palace_state

    def snapshot_then_delete(layout):
        state = real_state(layout)
        store = VectorStore(layout_for(palace))  # the other writer
        store.delete([f"d{i:04d}" for i in range(0, 400, 2)])
        store.close()
        return state

    monkeypatch.setattr(bundle_mod, "palace_state", snapshot_then_delete)
    report = export_bundle(layout_for(palace), tmp_path / "b")
    monkeypatch.undo()
    m = json.loads((Path(report.bundle) / "manifest.json").read_text())
    assert m["counts"]["drawers"] == 200 and m["totals"]["drawers"] == 200 and report.vanished == {"drawers": 200}
    run_cli("verify", "--bundle", report.bundle)
    incr = bundle_of(palace, tmp_path / "b", "--incremental")  # chains onto it and restores what is there
    cli_json("restore", incr, "--palace", tmp_path / "r")
    assert sorted(palace_rows(tmp_path / "r")) == [f"d{i:04d}" for i in range(1, 400, 2)]


@pytest.mark.parametrize("damage", ["truncate-state", "flip-drawers-byte"])
def test_item03_incremental_never_chains_onto_a_damaged_bundle(plain_palace, tmp_path, damage):
    full = bundle_of(plain_palace, tmp_path / "b")
    if damage == "truncate-state":
        data = (full / "state.parquet").read_bytes()
        (full / "state.parquet").write_bytes(data[: len(data) // 2])
    else:
        data = bytearray((full / "drawers.parquet").read_bytes())
        data[len(data) // 2] ^= 0x01
        (full / "drawers.parquet").write_bytes(bytes(data))
    r = cli_json("export", "--palace", plain_palace, "--out", tmp_path / "b", "--incremental")
    assert r["kind"] == "full" and full.name in r["full_because"] and "does not verify" in r["full_because"]
    run_cli("verify", "--bundle", r["bundle"])


def test_item05_sync_refuses_a_bundle_replica_that_does_not_verify(plain_palace, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    a, shared = tmp_path / "a", tmp_path / "shared"
    shutil.copytree(plain_palace, a)
    cli_json("sync", a, f"bundle:{shared}")
    (bundle,) = sorted(shared.glob("palace-*"))
    state = pq.read_table(bundle / "state.parquet")
    pq.write_table(state.slice(8), bundle / "state.parquet")  # 8 rows short: sync would delete 8 drawers
    proc = run_cli("sync", a, f"bundle:{shared}", check=1)
    assert "does not verify" in proc.stderr
    assert len(palace_rows(a)) == 400


def test_item06_replica_kind_is_explicit_or_unambiguous(plain_palace, tmp_path):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(plain_palace, a)
    shutil.copytree(plain_palace, b)
    # a stale bundle inside palace a (an old `export --out <palace>`) must not be taken for the replica
    bundle = bundle_of(plain_palace, tmp_path / "elsewhere")
    shutil.copytree(bundle, a / bundle.name)
    proc = run_cli("sync", a, b, check=1)
    assert "both a palace" in proc.stderr
    proc = run_cli("verify", "--palace", a, "--palace", b, check=1)
    assert "both a palace" in proc.stderr
    proc = run_cli("sync", b, f"bundle:{b}", check=1)
    assert "same directory" in proc.stderr
    run_cli("export", "--palace", b, "--out", b / "backups", check=1)  # bundles never go inside a palace


MANIFEST_TAMPERING = {
    "unknown-field": lambda m: m.update(extra=1),
    "empty-files": lambda m: m.update(files={}),
    "kind-flip": lambda m: m.update(kind="full", previous=None),
    "l2-space": lambda m: m["collections"]["drawers"].update({"hnsw:space": "l2"}),
    "bad-space": lambda m: m["collections"]["drawers"].update({"hnsw:space": "banana"}),
    "previous-escapes": lambda m: m.update(previous="../../etc/hostname"),
    "file-escapes": lambda m: m["files"].update({"../../etc/hostname": "0" * 64}),
    "name-mismatch": lambda m: m.update(name="palace-20200101T000000000000Z-incr"),
    "not-an-object": lambda m: (m.clear(), m.update({"schema_version": 1, "files": "x"})),
    "counts-not-ints": lambda m: m.update(counts={"drawers": "many"}),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_TAMPERING))
def test_item08_a_tampered_manifest_is_refused_and_nothing_is_restored(plain_palace, tmp_path, case):
    import shutil

    palace = tmp_path / "palace"
    shutil.copytree(plain_palace, palace)
    bundle_of(palace, tmp_path / "b")
    store = VectorStore(layout_for(palace))
    store.delete(["d0001"])
    store.close()
    incr = bundle_of(palace, tmp_path / "b", "--incremental")
    rewrite_manifest(incr, MANIFEST_TAMPERING[case])
    proc = run_cli("verify", "--bundle", incr, check=None)
    assert proc.returncode in (1, 4) and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli("restore", incr, "--palace", tmp_path / "r", check=1)
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_item08_unlisted_and_replaced_files_are_refused(plain_palace, tmp_path):
    import shutil

    bundle = bundle_of(plain_palace, tmp_path / "b")
    shutil.copy(bundle / "closets.parquet" if (bundle / "closets.parquet").exists() else bundle / "state.parquet",
                bundle / "extra.parquet")
    proc = run_cli("verify", "--bundle", bundle, check=4)
    assert "not listed" in proc.stdout + proc.stderr
    (bundle / "extra.parquet").unlink()
    # drop the drawers file's entry and replace the file: the unlisted file is refused, not restored
    rewrite_manifest(bundle, lambda m: m["files"].pop("drawers.parquet"))
    proc = run_cli("restore", bundle, "--palace", tmp_path / "r", check=1)
    assert not (tmp_path / "r").exists()


def test_item08_restore_checks_the_result_against_the_manifest_totals(plain_palace, tmp_path):
    """Every file intact by its (rewritten) sha256 and count, but the drawers file holds 5 rows where the
    palace held 400: the restored result is checked against the totals and nothing is put in place."""
    import hashlib

    import pyarrow.parquet as pq

    bundle = bundle_of(plain_palace, tmp_path / "b")
    pq.write_table(pq.read_table(bundle / "drawers.parquet").slice(0, 5), bundle / "drawers.parquet")
    digest = hashlib.sha256((bundle / "drawers.parquet").read_bytes()).hexdigest()
    rewrite_manifest(bundle, lambda m: (m["files"].update({"drawers.parquet": digest}),
                                        m["counts"].update(drawers=5)))
    run_cli("verify", "--bundle", bundle)  # each file agrees with the manifest...
    proc = run_cli("restore", bundle, "--palace", tmp_path / "r", check=1)
    assert "does not match the bundle" in proc.stderr  # ...but the result does not
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.restoring-*"))

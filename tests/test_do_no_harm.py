"""First, do no harm (issue 14): each test reproduces one way palace-etl could lose data, write
where it must not, hang or crash, and pins the fix. Test names carry the item number."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import orjson
import pytest

from etl.embed import EmbedderIdentity
from exporters.retention import select
from palace.bundles import list_bundles
from palace.layout import layout_for, write_sidecar
from palace.manifest import bundle_name, bundle_time
from palace.vectors import VectorStore

from .helpers import (
    SAMPLE,
    cli_json,
    flip_a_byte,
    kill_mid_transaction,
    palace_rows,
    run_cli,
)


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


def test_item01_retention_keeps_every_older_bundle_while_a_kept_incrementals_chain_cannot_be_read(tmp_path):
    """A kept incremental whose chain cannot be read (a link's manifest damaged) may still need
    every older bundle once that link is repaired: retention deletes none of them."""
    palace, out = tmp_path / "palace", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    for _ in range(3):
        cli_json("export", "--palace", palace, "--out", out, "--incremental", "--full-every", "10")
    full, first, second = list_bundles(out)
    (first / "manifest.json").write_bytes(b"{")  # cut short: a repairable link, as far as retention can tell
    r = cli_json("export", "--palace", palace, "--out", out, "--incremental", "--keep", "2")
    assert r["kind"] == "full" and "does not verify" in r["full_because"]
    assert r["removed_by_retention"] == [] and full.is_dir() and first.is_dir() and second.is_dir()
    bundles = list_bundles(out)
    assert select(bundles, keep=2) == set(bundles)
    assert select(bundles, daily=1) == {bundles[-1]}  # the new full bundle alone: it needs nothing older



def test_item01_a_bundle_written_while_the_clock_is_behind_the_newest_bundle_is_not_retentions_first_victim(tmp_path):
    """A machine whose clock ran a day ahead wrote a bundle, then the clock was put right (or a
    Raspberry Pi booted without network time). Tonight's bundle, named by the clock, would sort
    before it: retention, which keeps the newest by name, deleted tonight's backup as soon as it was
    written. A new bundle is named after the newest one in the directory, and the report says why."""
    palace, out = tmp_path / "palace", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    written = Path(cli_json("export", "--palace", palace, "--out", out)["bundle"])
    ahead = bundle_name(bundle_time(written.name).replace(tzinfo=dt.timezone.utc) + dt.timedelta(days=1), False)
    manifest = orjson.loads((written / "manifest.json").read_bytes())
    (written / "manifest.json").write_bytes(orjson.dumps(manifest | {"name": ahead}))
    written.rename(out / ahead)  # as that machine wrote it, a day ahead
    extra = tmp_path / "tonight.jsonl"
    extra.write_text(json.dumps({"id": "t1", "text": "written tonight"}) + "\n")
    cli_json("import", "jsonl", extra, "--palace", palace)

    r = cli_json("export", "--palace", palace, "--out", out, "--incremental", "--keep", "1")
    tonight = Path(r["bundle"])
    assert tonight.is_dir() and r["removed_by_retention"] == [] and r["previous"] == ahead
    assert tonight.name > ahead and f"not past the newest bundle {ahead}" in r["named_after"]
    assert r["counts"]["drawers"] == 1 and cli_json("verify", "--bundle", tonight)["ok"]
    again = run_cli("export", "--palace", palace, "--out", out, "--incremental", "--keep", "1")
    assert f"not past the newest bundle {tonight.name}: named just after it; check this machine's clock" \
        in again.stderr


def test_item01_an_export_leaves_another_palaces_or_machines_bundles_in_its_directory_alone(tmp_path):
    """Two palaces backed up into one directory (or one palace path on two machines, as
    ~/.mempalace/palace is on every machine, onto one shared disk): each export's retention removed
    the other's bundles (``--keep 1``: only one palace had a backup at any time), and an incremental
    chained onto the other palace's bundle. Now an export chains onto and prunes only this
    machine's bundles of its own palace, says the others are there, and leaves them alone."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "o1", "text": "a memory of the other palace"}) + "\n")
    cli_json("import", "jsonl", other, "--palace", b)

    a1 = Path(cli_json("export", "--palace", a, "--out", out, "--incremental", "--keep", "1")["bundle"])
    rb = cli_json("export", "--palace", b, "--out", out, "--incremental", "--keep", "1")
    assert rb["kind"] == "full" and rb["full_because"] is None and rb["others"] == [a1.name]
    assert rb["removed_by_retention"] == [] and a1.is_dir()
    b1 = Path(rb["bundle"])
    said = run_cli("export", "--palace", a, "--out", out, "--incremental", "--keep", "1", "--dry-run").stderr
    assert f"1 bundle(s) of another palace, wing, machine or sync replica (newest {b1.name})" in said
    r = cli_json("export", "--palace", a, "--out", out, "--incremental", "--keep", "1")
    assert r["kind"] == "incremental" and r["previous"] == a1.name and r["deleted"] == 0, r
    assert r["removed_by_retention"] == [] and b1.is_dir() and r["others"] == [b1.name]
    a2 = Path(r["bundle"])

    # The same palace path exported from another machine: its bundle names the path, not the host.
    theirs = out / bundle_name(bundle_time(b1.name).replace(tzinfo=dt.timezone.utc) + dt.timedelta(seconds=1), False)
    shutil.copytree(a1, theirs)
    manifest = orjson.loads((theirs / "manifest.json").read_bytes())
    tag = hashlib.sha256(f"another-host\0{manifest['palace']}".encode()).hexdigest()[:16]
    manifest["watermark"]["owner"] = tag
    (theirs / "manifest.json").write_bytes(orjson.dumps(manifest | {"name": theirs.name}))
    # A bundle this machine wrote of palace a before owners were recorded: a's, by the palace it names.
    del manifest["watermark"]["owner"]
    legacy = out / bundle_name(bundle_time(theirs.name).replace(tzinfo=dt.timezone.utc) + dt.timedelta(seconds=1),
                               False)
    shutil.copytree(a1, legacy)
    (legacy / "manifest.json").write_bytes(orjson.dumps(manifest | {"name": legacy.name}))

    r = cli_json("export", "--palace", a, "--out", out, "--incremental", "--keep", "1")
    assert r["kind"] == "incremental" and r["previous"] == legacy.name, r
    assert sorted(r["removed_by_retention"]) == sorted([a1.name, a2.name])
    assert sorted(r["others"]) == sorted([b1.name, theirs.name]) and b1.is_dir() and theirs.is_dir()
    rb = cli_json("export", "--palace", b, "--out", out, "--incremental", "--keep", "1")
    assert rb["kind"] == "incremental" and rb["previous"] == b1.name and rb["removed_by_retention"] == []
    assert {p.name for p in list_bundles(out)} == {theirs.name, legacy.name, Path(r["bundle"]).name, b1.name,
                                                   Path(rb["bundle"]).name}  # b1: the chain of b's newest


def test_item01_an_exports_retention_keeps_the_bundles_a_sync_replicas_bundles_build_on(tmp_path):
    """An export directory used as a sync replica (as the README allows): the replica's first bundle
    is an incremental chained onto the export's full bundle. The export's retention counted only its
    own bundles, so ``--keep 1`` removed that full bundle and left the replica's chain broken (every
    later sync refused it, and its bundles no longer restored). Retention now keeps every bundle any
    bundle left in the directory builds on, whoever wrote it."""
    palace, out = tmp_path / "palace", tmp_path / "shared"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    full = Path(cli_json("export", "--palace", palace, "--out", out)["bundle"])
    side = tmp_path / "side"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "s1", "text": "written on another machine"}) + "\n")
    cli_json("import", "jsonl", other, "--palace", side)
    assert cli_json("sync", side, f"bundle:{out}")["converged"]
    replica = list_bundles(out)[-1]
    assert replica.name.endswith("-incr")

    r = cli_json("export", "--palace", palace, "--out", out, "--keep", "1")
    assert r["removed_by_retention"] == [] and full.is_dir(), r
    assert cli_json("verify", "--bundle", replica)["ok"]
    assert cli_json("sync", side, f"bundle:{out}")["converged"]


def test_item01_a_wing_shared_from_the_backup_directory_is_no_backup_of_the_palace(tmp_path):
    """A wing exported into the nightly backup directory (``export --wing``, to share it) counted as
    one of the palace's backups: its retention removed the whole palace's backup of the day and
    kept the one wing, and the nightly retention removed the shared wing. A wing's bundles are now a
    line of their own: neither chains onto or prunes the other."""
    palace, out = tmp_path / "palace", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    (wing,) = {m["metadata"]["wing"] for m in palace_rows(palace).values()}
    whole = Path(cli_json("export", "--palace", palace, "--out", out, "--keep-daily", "7")["bundle"])
    shared = cli_json("export", "--palace", palace, "--out", out, "--wing", wing, "--keep-daily", "7")
    assert shared["removed_by_retention"] == [] and whole.is_dir(), shared
    night = cli_json("export", "--palace", palace, "--out", out, "--incremental", "--keep-daily", "7")
    assert night["kind"] == "incremental" and night["previous"] == whole.name, night
    assert night["removed_by_retention"] == [] and Path(shared["bundle"]).is_dir()
    again = cli_json("export", "--palace", palace, "--out", out, "--wing", wing, "--incremental", "--keep", "1")
    assert again["previous"] == Path(shared["bundle"]).name and again["removed_by_retention"] == []


def test_item01_an_export_named_with_host_keeps_its_line_where_the_host_name_changes_each_run(tmp_path):
    """In a container the host name is new each run: each night's export was a new owner, so
    retention never pruned and no incremental chained (the disk filled with full bundles, and the
    warning named every earlier night). ``--host`` names whose backups they are."""
    palace, out = tmp_path / "palace", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    job = ("--host", "nightly-job", "--incremental", "--keep", "1")
    first = Path(cli_json("export", "--palace", palace, "--out", out, *job)["bundle"])
    mine = cli_json("export", "--palace", palace, "--out", out, "--incremental", "--keep", "1")  # this host's name
    assert mine["kind"] == "full" and mine["others"] == [first.name] and mine["removed_by_retention"] == []
    again = cli_json("export", "--palace", palace, "--out", out, *job)
    assert again["kind"] == "incremental" and again["previous"] == first.name and again["others"] == [
        Path(mine["bundle"]).name]
    last = cli_json("export", "--palace", palace, "--out", out, "--host", "nightly-job", "--keep", "1")
    assert sorted(last["removed_by_retention"]) == sorted([first.name, Path(again["bundle"]).name])
    assert Path(mine["bundle"]).is_dir()
    proc = run_cli("export", "--palace", palace, "--out", tmp_path / "human", "--format", "jsonl", "--host", "x",
                   check=1)
    assert "--host" in proc.stderr and not (tmp_path / "human").exists()


def test_item05_an_export_into_a_sync_replicas_directory_is_not_taken_for_the_replicas_state(tmp_path):
    """Two machines sync through a shared directory; one of them also writes its nightly backup
    there. The replica took the newest bundle of the directory for its state, so the export (that
    machine's palace alone) looked like a replica that had lost what the other machine had synced
    into it: the other machine's next sync deleted its new memory, and the exporting machine never
    got it. The replica now reads its own bundles only (an export starts it when it has none)."""
    a, c, shared = tmp_path / "a", tmp_path / "c", tmp_path / "shared"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    assert cli_json("sync", a, f"bundle:{shared}")["converged"]
    assert cli_json("sync", c, f"bundle:{shared}")["converged"]
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": "n1", "text": "written on machine c after the first sync"}) + "\n")
    cli_json("import", "jsonl", new, "--palace", c)
    (written,) = set(palace_rows(c)) - set(palace_rows(a))
    assert cli_json("sync", c, f"bundle:{shared}")["converged"]
    replica = list_bundles(shared)[-1]
    for bundle in list_bundles(shared):  # as syncs wrote them before owners were recorded: by name alone
        manifest = orjson.loads((bundle / "manifest.json").read_bytes())
        assert manifest["watermark"].pop("owner") == "sync-replica" and manifest["palace"].startswith("bundle:")
        (bundle / "manifest.json").write_bytes(orjson.dumps(manifest))

    backup = Path(cli_json("export", "--palace", a, "--out", shared)["bundle"])  # a's nightly backup
    assert backup.name > replica.name
    r = cli_json("sync", c, f"bundle:{shared}")
    assert r["plan"]["delete_a"] == {} and written in palace_rows(c), r
    assert cli_json("sync", a, f"bundle:{shared}")["converged"]
    assert written in palace_rows(a)
    # the export still goes by its own bundles: the replica's are another's, never pruned
    again = cli_json("export", "--palace", a, "--out", shared, "--incremental", "--keep", "1")
    assert again["previous"] == backup.name and again["removed_by_retention"] == []
    assert replica.is_dir() and cli_json("sync", c, f"bundle:{shared}")["converged"]

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
    import re
    from urllib.parse import unquote

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


def test_item02_rows_deleted_during_a_whole_export_are_neither_held_nor_counted(plain_palace, tmp_path, monkeypatch):
    """A whole-palace bundle reads each row once; a writer deleting rows between the read of their
    ids and of their contents leaves a bundle that holds, counts and restores exactly the rest."""
    import shutil

    from exporters.bundle import export_bundle
    from palace.stores import ChromaDirStore, open_store

    palace = tmp_path / "palace"
    shutil.copytree(plain_palace, palace)
    real_fetch = ChromaDirStore.fetch

    def delete_then_fetch(self, table, ids, vectors=True):
        if table == "drawers":
            store = VectorStore(layout_for(palace))  # the other writer
            store.delete([f"d{i:04d}" for i in range(0, 400, 2)])
            store.close()
        return real_fetch(self, table, ids, vectors)

    monkeypatch.setattr(ChromaDirStore, "fetch", delete_then_fetch)
    report = export_bundle(open_store(palace), tmp_path / "b")
    monkeypatch.undo()
    m = json.loads((Path(report.bundle) / "manifest.json").read_text())
    assert m["counts"]["drawers"] == 200 and m["totals"]["drawers"] == 200 and report.vanished == {}
    run_cli("verify", "--bundle", report.bundle)
    cli_json("restore", report.bundle, "--palace", tmp_path / "r")
    assert sorted(palace_rows(tmp_path / "r")) == [f"d{i:04d}" for i in range(1, 400, 2)]


def test_item02_rows_deleted_during_an_incremental_export_become_its_tombstones(plain_palace, tmp_path, monkeypatch):
    """A writer deletes rows between an incremental export's snapshot and its fetch: rows an earlier
    bundle holds become tombstones of this one, so the chain restores without them (it restored them,
    and refused its own totals, before)."""
    import shutil

    import chromadb

    from exporters.bundle import export_bundle
    from palace.stores import ChromaDirStore, open_store

    palace = tmp_path / "palace"
    shutil.copytree(plain_palace, palace)
    bundle_of(palace, tmp_path / "b")
    col = chromadb.PersistentClient(str(palace)).get_collection("mempalace_drawers")
    col.update(ids=[f"d{i:04d}" for i in range(400)], metadatas=[{"wing": "w", "room": "moved"}] * 400)
    del col
    real_changes = ChromaDirStore.changes

    def changes_then_delete(self, known, marks):
        got = real_changes(self, known, marks)
        store = VectorStore(layout_for(palace))  # the other writer
        store.delete([f"d{i:04d}" for i in range(0, 400, 2)])
        store.close()
        return got

    monkeypatch.setattr(ChromaDirStore, "changes", changes_then_delete)
    report = export_bundle(open_store(palace), tmp_path / "b", incremental=True)
    monkeypatch.undo()
    m = json.loads((Path(report.bundle) / "manifest.json").read_text())
    assert m["counts"]["drawers"] == 200 and m["totals"]["drawers"] == 200 and report.vanished == {"drawers": 200}
    run_cli("verify", "--bundle", report.bundle)
    incr = bundle_of(palace, tmp_path / "b", "--incremental")  # chains onto it and restores what is there
    cli_json("restore", incr, "--palace", tmp_path / "r")
    assert sorted(palace_rows(tmp_path / "r")) == [f"d{i:04d}" for i in range(1, 400, 2)]


@pytest.mark.parametrize("damage", ["truncate-state", "flip-drawers-byte"])
def test_item03_incremental_never_chains_onto_a_damaged_bundle(plain_palace, tmp_path, damage):
    import shutil

    full = bundle_of(plain_palace, tmp_path / "b")
    if damage == "truncate-state":
        data = (full / "state.parquet").read_bytes()
        (full / "state.parquet").write_bytes(data[: len(data) // 2])
    else:
        flip_a_byte(full / "drawers.parquet")
    r = cli_json("export", "--palace", plain_palace, "--out", tmp_path / "b", "--incremental")
    assert r["kind"] == "full" and full.name in r["full_because"] and "does not verify" in r["full_because"]
    run_cli("verify", "--bundle", r["bundle"])
    quiet = run_cli("export", "--palace", plain_palace, "--out", tmp_path / "c", "--quiet")  # cron's form:
    assert quiet.stderr == ""  # nothing to say about a clean run...
    shutil.rmtree(Path(r["bundle"]))
    noisy = run_cli("export", "--palace", plain_palace, "--out", tmp_path / "b", "--incremental", "--quiet")
    assert "warning" in noisy.stderr and "does not verify" in noisy.stderr  # ...but a damaged parent is said


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
    (tmp_path / "b-link").symlink_to(b)
    proc = run_cli("migrate", b, tmp_path / "b-link", check=1)  # said as such, not "sync the two"
    assert "same directory" in proc.stderr and "sync" not in proc.stderr
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
    assert "is not a valid manifest" in proc.stdout + proc.stderr  # refused for what it is, not by luck
    proc = run_cli("restore", incr, "--palace", tmp_path / "r", check=1)
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
    assert "is not a valid manifest" in proc.stderr


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
    size = (bundle / "drawers.parquet").stat().st_size
    rewrite_manifest(bundle, lambda m: (m["files"].update({"drawers.parquet": digest}),
                                        m["sizes"].update({"drawers.parquet": size}), m["counts"].update(drawers=5)))
    run_cli("verify", "--bundle", bundle)  # each file agrees with the manifest...
    proc = run_cli("restore", bundle, "--palace", tmp_path / "r", check=1)
    assert "does not match the bundle" in proc.stderr  # ...but the result does not
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.restoring-*"))


# ------------------------------------------------------------------ item 4
def test_item04_restore_force_waits_for_a_running_import_and_never_splits_it(plain_palace, tmp_path):
    import subprocess
    import sys
    import time

    bundle = bundle_of(plain_palace, tmp_path / "b")
    target = tmp_path / "target"
    imp = subprocess.Popen([sys.executable, "-m", "etl.cli", "import", "mcp-memory", str(SAMPLE), "--palace",
                            str(target), "--json", "--batch-size", "5"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    ledger = target / ".palace-etl" / "ledger.sqlite3"
    deadline = time.monotonic() + 120
    while not ledger.exists():  # the import is inside its run (holds the session lock)
        assert imp.poll() is None and time.monotonic() < deadline, imp.stderr.read() if imp.poll() else "slow"
        time.sleep(0.05)
    proc = run_cli("restore", bundle, "--palace", target, "--force", "--lock-timeout", "0.5", check=None)
    running = imp.poll() is None
    out, err = imp.communicate(timeout=300)
    assert imp.returncode == 0, err
    if not running:  # the import (73 batches) beat the restore to the end: the lock was never met
        pytest.skip("the import finished before the restore started; nothing to race")
    assert proc.returncode == 11 and "import is running" in proc.stderr  # refused, nothing moved aside
    assert not list(tmp_path.glob("target.before-restore-*"))
    assert len(palace_rows(target)) == json.loads(out)["drawers_written"] == 363


def test_item04_status_verify_restore_take_lock_timeout(plain_palace, tmp_path):
    for verb in (["status", "--palace", plain_palace], ["verify", "--palace", plain_palace, "--probes", "0"],
                 ["restore", tmp_path / "nothing", "--palace", tmp_path / "r"]):
        proc = run_cli(*verb, "--lock-timeout", "2", check=None)
        assert "No such option" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ item 7
def test_item07_a_hot_journal_is_rolled_back_not_reported_as_corruption(plain_palace, tmp_path):
    import shutil

    palace = tmp_path / "palace"
    shutil.copytree(plain_palace, palace)
    kill_mid_transaction(palace / "chroma.sqlite3")
    proc = run_cli("verify", "--palace", palace, "--probes", "0")  # nobody holds it: rolled back, no finding
    assert not Path(f"{palace}/chroma.sqlite3-journal").exists()
    kill_mid_transaction(palace / "chroma.sqlite3")
    status = cli_json("status", "--palace", palace)
    assert status["drawers"] == 400
    assert "sqlite_corrupt" not in proc.stdout and "--force" not in proc.stdout + proc.stderr
    assert not Path(f"{palace}/chroma.sqlite3-journal").exists()  # rolled back, as SQLite intends
    assert {r["document"] for r in palace_rows(palace).values()} == {f"memory {i}" for i in range(400)}
    run_cli("export", "--palace", palace, "--out", tmp_path / "b")


def test_item07_a_hot_journal_beside_a_lock_holder_is_read_around(plain_palace, tmp_path):
    import shutil
    import subprocess
    import sys

    palace = tmp_path / "palace"
    shutil.copytree(plain_palace, palace)
    kill_mid_transaction(palace / "chroma.sqlite3")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom palace.lock import palace_lock\n"
                               f"with palace_lock({str(palace)!r}):\n print('held', flush=True)\n time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli_json("status", "--palace", palace)["drawers"] == 400  # read from a rolled-back copy
        assert Path(f"{palace}/chroma.sqlite3-journal").exists()  # the live palace was not touched
        # verify says what it is, and that a MemPalace server's "repair" advice is wrong for it
        found = cli_json("verify", "--palace", palace, "--probes", "0", check=None)["findings"]
        assert [f["code"] for f in found] == ["interrupted_write"] and "Do not repair" in found[0]["message"]
        assert "palace-etl status" in found[0]["remedy"] and "--force" not in found[0]["remedy"]
        assert Path(f"{palace}/chroma.sqlite3-journal").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli_json("status", "--palace", palace)["drawers"] == 400  # the remedy: the lock is free now
    assert not Path(f"{palace}/chroma.sqlite3-journal").exists()
    v = cli_json("verify", "--palace", palace, "--probes", "0")
    assert v["findings"] == [] and "retrieval probes (--probes 0)" in v["not_checked"]  # skipped, and says so


# ------------------------------------------------------------------ items 11, 12, 13
def test_item11_symlinks_are_refused_not_followed(plain_palace, tmp_path):
    import shutil

    from .helpers import FIXTURES, SAMPLE

    outside = tmp_path / "outside"
    outside.mkdir()
    # a symlinked .palace-etl would move the ledger outside the palace
    p1 = tmp_path / "p1"
    p1.mkdir()
    (p1 / ".palace-etl").symlink_to(outside)
    proc = run_cli("import", "mcp-memory", SAMPLE, "--palace", p1, check=1)
    assert "symlink" in proc.stderr and not any(outside.iterdir())
    # a dangling symlink at the quarantine file would create its target outside with user records
    broken = FIXTURES / "mcp-memory" / "broken.jsonl"
    p2 = tmp_path / "p2"
    run_id = cli_json("import", "mcp-memory", broken, "--palace", p2, "--dry-run", check=None)["run_id"]
    (p2 / ".palace-etl" / "quarantine").mkdir(parents=True)
    (p2 / ".palace-etl" / "quarantine" / f"{run_id}.jsonl").symlink_to(outside / "leak.jsonl")
    proc = run_cli("import", "mcp-memory", broken, "--palace", p2, check=None)
    assert proc.returncode == 1 and "symlink" in proc.stderr and not (outside / "leak.jsonl").exists()
    # a symlinked .export.lock would be truncated and overwritten
    backups = tmp_path / "backups"
    backups.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious")
    (backups / ".export.lock").symlink_to(victim)
    run_cli("export", "--palace", plain_palace, "--out", backups, check=1)
    assert victim.read_text() == "precious"
    shutil.rmtree(outside)


def test_item12_a_palace_path_with_hash_or_question_mark_opens_that_palace(plain_palace, tmp_path):
    import shutil

    for name in ("p#x", "p?x"):
        palace = tmp_path / name
        shutil.copytree(plain_palace, palace)
        assert cli_json("status", "--palace", palace)["drawers"] == 400
        assert not (tmp_path / "p").exists()


def test_item13_private_records_keep_private_modes(plain_palace, tmp_path):
    from .helpers import FIXTURES

    palace = tmp_path / "p"
    run_cli("import", "mcp-memory", FIXTURES / "mcp-memory" / "broken.jsonl", "--palace", palace, check=3)
    state = palace / ".palace-etl"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "quarantine").stat().st_mode) == 0o700
    for f in [*(state / "quarantine").iterdir(), state / "ledger.sqlite3"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    bundle = bundle_of(plain_palace, tmp_path / "b")
    cli_json("restore", bundle, "--palace", tmp_path / "r")
    for p in [tmp_path / "r", *(tmp_path / "r").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


# ------------------------------------------------------------------ items 15, 16, 17: hostile sources
def run_bounded(*args, check=None):
    """The CLI with a hang guard: a source that hangs the importer fails the test instead of the suite."""
    return run_cli(*args, check=check, timeout=120)


@pytest.mark.parametrize("name", ["mem0", "mcp-memory", "letta", "csv", "parquet", "claude-code", "basic-memory",
                                  "auto"])
def test_item15_a_fifo_is_refused_not_read(tmp_path, name):
    fifo = tmp_path / "memory.json"
    os.mkfifo(fifo)
    proc = run_bounded("import", name, fifo, "--palace", tmp_path / "p")
    assert proc.returncode in (1, 10) and "Traceback" not in proc.stderr, proc.stderr
    assert "FIFO" in proc.stderr  # refused for what it is (auto used to say only "no importer recognises")
    assert not (tmp_path / "p").exists()


def test_item16_a_file_that_is_not_the_format_is_said_so_and_creates_nothing(tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_bytes(np.random.default_rng(3).bytes(4096))
    proc = run_bounded("import", "chatgpt", junk, "--palace", tmp_path / "p1")
    assert proc.returncode == 1 and "not a chatgpt source" in proc.stderr and not (tmp_path / "p1").exists()
    for content in (b"", np.random.default_rng(4).bytes(2048)):
        fake = tmp_path / "fake-palace"
        fake.mkdir(exist_ok=True)
        (fake / "chroma.sqlite3").write_bytes(content)
        proc = run_bounded("import", "palace", fake, "--palace", tmp_path / "p2")
        assert proc.returncode in (1, 10) and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "p2").exists()


@pytest.mark.parametrize("name, make", [
    ("mem0", lambda d: (d / "m.json").write_bytes(b"")),
    ("mcp-memory", lambda d: (d / "memory.jsonl").write_bytes(b"\n\n")),
    ("basic-memory", lambda d: (d / "notes").mkdir()),
    ("jsonl", lambda d: (d / "rows.jsonl").write_bytes(b"")),
])
def test_item16_empty_input_is_not_an_error_and_creates_nothing(tmp_path, name, make):
    make(tmp_path)
    (src,) = [p for p in tmp_path.iterdir()]
    r = json.loads(run_bounded("import", name, src, "--palace", tmp_path / "p", "--json", check=0).stdout)
    assert r["drawers_read"] == 0 and not (tmp_path / "p").exists()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return path


def _truncated_gz_zip(path: Path) -> Path:
    import gzip

    lines = b"".join(json.dumps({"id": f"m{i}", "memory": f"memory {i}", "user_id": "u"}).encode() + b"\n"
                     for i in range(2000))
    gz = gzip.compress(lines)
    return _zip(path, {"memories.jsonl.gz": gz[: len(gz) // 2]})


def _bad_history(path: Path) -> Path:
    import sqlite3

    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE history (id TEXT)")  # the table, without the columns mem0 writes
    return path


@pytest.mark.parametrize("name, make", [
    ("mcp-memory", lambda d: (d / "adir").mkdir() or d / "adir"),
    ("letta", lambda d: (d / "adir").mkdir() or d / "adir"),
    ("mem0", lambda d: _zip(d / "export.zip", {"readme.txt": b"hello"})),
    ("mem0", lambda d: _truncated_gz_zip(d / "export.zip")),
    ("mem0", lambda d: _bad_history(d / "history.db")),
])
def test_item17_broken_sources_are_file_and_cause_not_tracebacks(tmp_path, name, make):
    src = make(tmp_path)
    proc = run_bounded("import", name, src, "--palace", tmp_path / "p")
    assert proc.returncode in (1, 3, 10) and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode != 130 and "interrupted" not in proc.stderr  # an EOFError is not Ctrl-C
    assert str(src.name) in proc.stderr or proc.returncode == 3


def test_item17_restore_onto_a_file_or_a_foreign_directory_builds_nothing(plain_palace, tmp_path):
    bundle = bundle_of(plain_palace, tmp_path / "b")
    (tmp_path / "a-file").write_text("x")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    for target in (tmp_path / "a-file", foreign):
        for dry in ([], ["--dry-run"]):
            proc = run_cli("restore", bundle, "--palace", target, "--force", *dry, check=1)
            assert "nothing written" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "a-file").read_text() == "x" and tree(foreign) == {"cat.jpg": b"\xff\xd8"}
    assert not list(tmp_path.glob(".*restoring-*")) and not list(tmp_path.glob("*before-restore*"))


# ------------------------------------------------------------------ item 18: crash leftovers
def test_item18_a_restore_killed_between_its_renames_is_finished_by_the_next_run(plain_palace, tmp_path):
    import shutil

    from .helpers import SAMPLE

    bundle = bundle_of(plain_palace, tmp_path / "b")
    target = tmp_path / "target"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", target)
    proc = run_cli("restore", bundle, "--palace", target, "--force", check=None,
                   env={"PALACE_ETL_TEST_CRASH_AT": "restore-swap"})
    assert proc.returncode == -9 and not target.exists()  # killed with the old palace aside, the new not in
    (aside,) = tmp_path.glob("target.before-restore-*")
    r = cli_json("restore", bundle, "--palace", target, "--force")
    assert r["recovered"] and len(palace_rows(target)) == 400  # the killed swap was completed first
    assert aside.exists() and not list(tmp_path.glob(".target.restoring-*"))
    shutil.rmtree(aside)


def test_item18_temp_dirs_of_killed_exports_are_cleaned(plain_palace, tmp_path):
    out = tmp_path / "b"
    bundle_of(plain_palace, out)
    stale = out / ".tmp-palace-20260101T000000000000Z-full"
    stale.mkdir()
    (stale / "drawers.parquet").write_bytes(b"half")
    bundle_of(plain_palace, out, "--incremental")
    assert not stale.exists() and len(list(out.glob("palace-*"))) == 2


HOLD_A_COPY = ("import sys, time\n"
               "from palace.layout import layout_for\n"
               "from palace.stores.chroma_dir import ChromaDirReader\n"
               "reader = ChromaDirReader(layout_for(sys.argv[1]))\n"
               "reader.counts()\n"  # takes its private copies
               "print('ready', flush=True)\n"
               "time.sleep(600)\n")


def test_item18_private_copies_of_killed_runs_are_removed_by_the_next_run(plain_palace, tmp_path):
    """A run killed with SIGKILL (the OOM killer) cannot remove its private copy of the palace from the
    temp directory, and one left every night fills the disk. The next run removes it; it leaves alone
    the copies of a run still going and every directory it did not make, whatever its name."""
    import subprocess
    import sys

    from palace.scratch import OWNER

    tmp = tmp_path / "tmp"
    tmp.mkdir()

    def holder() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_A_COPY, str(plain_palace)], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "TMPDIR": str(tmp)})
        assert proc.stdout.readline().strip() == "ready"
        return proc

    killed = holder()
    killed_dirs = set(tmp.iterdir())
    assert len(killed_dirs) == 2  # the Chroma files, and the KG with the ledger
    killed.kill()
    killed.wait()
    live = holder()
    try:
        live_dirs = set(tmp.iterdir()) - killed_dirs
        valuables = tmp_path / "valuables"
        valuables.mkdir()
        (valuables / OWNER).write_text("not a lock of ours")
        planted = {tmp / "palace-etl-snapshot-link": lambda p: p.symlink_to(valuables),
                   tmp / "palace-etl-snapshot-older": lambda p: (p.mkdir(), (p / "chroma.sqlite3").write_text("x")),
                   tmp / "palace-etl-snapshot-fifo": lambda p: (p.mkdir(), os.mkfifo(p / OWNER)),
                   tmp / "palace-etl-snapshot-ownerlink": lambda p: (p.mkdir(), (p / OWNER).symlink_to(valuables / OWNER))}
        if os.geteuid() == 0:  # a directory of another user's run
            planted[tmp / "palace-etl-journal-nobody"] = lambda p: (p.mkdir(), (p / OWNER).write_text("1"),
                                                                   os.chown(p, 65534, 65534))
        for path, make in planted.items():
            make(path)
        before = tree(valuables)
        run_cli("export", "--palace", plain_palace, "--out", tmp_path / "b", env={"TMPDIR": str(tmp)}, timeout=120)
        assert set(tmp.iterdir()) == live_dirs | set(planted)  # the killed run's copies went, nothing else did
        assert all(len(list(d.iterdir())) > 1 for d in live_dirs) and tree(valuables) == before
    finally:
        live.kill()
        live.wait()
    run_cli("export", "--palace", plain_palace, "--out", tmp_path / "b", env={"TMPDIR": str(tmp)}, timeout=120)
    assert set(tmp.iterdir()) == set(planted)


# ------------------------------------------------------------------ item 14
@pytest.mark.parametrize("name", ["mem0", "zep", "mcp-memory-service", "chatgpt", "claude-ai", "claude-mem", "jsonl",
                                  "letta", "mcp-memory", "auto"])
@pytest.mark.parametrize("shape", ["array", "object"])
def test_item14_deeply_nested_json_is_refused_quickly(tmp_path, name, shape):
    bomb = b"[" * 100000 + b"]" * 100000
    src = tmp_path / "bomb.json"
    src.write_bytes(bomb if shape == "array" else b'{"results": ' + bomb + b', "memories": []}')
    proc = run_bounded("import", name, src, "--palace", tmp_path / "p")  # the guard is 120 s; a fix takes ~1 s
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and str(src.name) in proc.stderr, proc.stderr
    assert not (tmp_path / "p").exists()


def test_item14_the_depth_check_ignores_brackets_inside_strings():
    import io

    from importers.base import json_depth_exceeds

    assert not json_depth_exceeds(io.BytesIO(b'{"a": "[[[[[[[[[[[[", "b": ["\\"]]]]]"]}'), limit=3)
    assert json_depth_exceeds(io.BytesIO(b'[' + b'["]]]]]]", ' * 10 + b']' * 11), limit=5)  # hidden closers
    assert json_depth_exceeds(io.BytesIO(b'["' + b'x' * 100 + b'", ' + b'[' * 10 + b']' * 10 + b']'), limit=5,
                              chunk=7)  # strings and escapes split across reads


# ------------------------------------------------------------------ item 19
def test_item19_a_huge_memory_is_cut_before_tokenising_to_the_same_vector(embedder):
    import random

    rng = random.Random(19)
    words = ["memory", "palace", "drawer", "naïve", "東京", "x" * 120, "e.g.", "(paren)", "tab\there", "a-b_c"]
    for n in (300, 3000, 60000):
        text = " ".join(rng.choice(words) for _ in range(n))
        assert embedder._tok.encode(embedder._window(text)).ids == embedder._tok.encode(text).ids
    huge = "the palace keeps every word " * 2_000_000  # 56 MB in one memory
    head = " ".join(huge.split()[:400])
    v_huge, v_head = embedder.embed([huge, head])
    assert float(v_huge @ v_head) > 0.999999  # the same 256 tokens, so the same vector


# ------------------------------------------------------------------ item 20
def test_item20_last_writer_wins_compares_instants_across_time_zones(tmp_path):
    import subprocess
    import sys

    a, b = tmp_path / "la", tmp_path / "tokyo"
    base = {"x": ("first version", {"wing": "w", "room": "r", "last_modified": "2026-11-01T10:00:00"})}
    make_palace(a, base)
    make_palace(b, base)
    for palace, tz in ((a, "America/Los_Angeles"), (b, "Asia/Tokyo")):  # each machine records its zone
        subprocess.run([sys.executable, "-c", f"from palace.clock import record_zone; record_zone({str(palace / '.palace-etl')!r})"],
                       check=True, env={**os.environ, "TZ": tz})
    cli_json("sync", a, b)

    def edit(palace: Path, doc: str, naive_local: str, seed: int) -> None:
        store = VectorStore(layout_for(palace))
        store.upsert(["x"], [doc], [{"wing": "w", "room": "r", "last_modified": naive_local}], unit(1, seed))
        store.close()

    edit(b, "tokyo, at 20:00 UTC", "2026-12-02T05:00:00", 2)  # earlier instant, later-looking text
    edit(a, "los angeles, at 22:00 UTC", "2026-12-01T14:00:00", 3)  # the last writer
    r = json.loads(run_cli("sync", a, b, "--json", env={"TZ": "UTC"}).stdout)
    assert [c["rule"] for c in r["conflicts"]] == ["last writer wins"] and r["conflicts"][0]["winner"] == "a"
    for palace in (a, b):
        assert palace_rows(palace)["x"]["document"] == "los angeles, at 22:00 UTC"


def test_item20_every_stamp_format_becomes_the_same_instant():
    import datetime as dt
    from zoneinfo import ZoneInfo

    from palace.clock import instant

    la = ZoneInfo("America/Los_Angeles")
    same = ["2026-12-01T22:00:00+00:00", "2026-12-01T22:00:00Z", "2026-12-01T14:00:00-08:00",
            "2026-12-01T14:00:00", "1796162400", 1796162400.0]
    got = {instant(s, la) for s in same}
    assert got == {dt.datetime(2026, 12, 1, 22, tzinfo=dt.timezone.utc).timestamp()}
    assert instant("2026-12-01 22:00:00", dt.timezone.utc) == got.pop()  # SQLite CURRENT_TIMESTAMP
    assert instant("not a time", la) is None


# ------------------------------------------------------------------ item 9
@pytest.fixture
def small_disk(tmp_path):
    """A real 28 MB filesystem (tmpfs), enlarged on request; needs root, as CI and this machine have."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=28m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small filesystem needs root")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, grow
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_item09_a_full_disk_stops_the_import_cleanly_and_the_next_run_resumes(small_disk, tmp_path):
    import random
    import sqlite3

    disk, grow = small_disk
    rng = random.Random(9)
    src = tmp_path / "rows.jsonl"
    with open(src, "w") as f:
        for i in range(3000):
            words = " ".join(rng.choice(["alpha", "beta", "palace", "memory", "drawer"]) for _ in range(20))
            f.write(json.dumps({"id": f"r{i}", "text": f"{i} {words}", "wing": "w", "room": "r"}) + "\n")
    palace = disk / "p"
    proc = run_cli("import", "jsonl", src, "--palace", palace, "--batch-size", "500", check=1)
    assert "stopped before writing" in proc.stderr and "Traceback" not in proc.stderr
    with sqlite3.connect(palace / ".palace-etl" / "ledger.sqlite3") as c:
        assert c.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]
    grow("400m")
    r = cli_json("import", "jsonl", src, "--palace", palace, "--batch-size", "500")
    assert r["drawers_read"] == 3000 and r["drawers_written"] + r["drawers_unchanged"] == 3000
    assert r["drawers_unchanged"] > 0  # the first run committed batches before it stopped
    run_cli("verify", "--palace", palace, "--against", "jsonl", src)
    assert cli_json("status", "--palace", palace, "--probes", "5")["drawers"] == 3000
    run_cli("export", "--palace", palace, "--out", tmp_path / "b")


def test_item09_a_reader_whose_temp_disk_is_full_says_so_and_leaves_nothing(small_disk, tmp_path):
    """A lock-free reader's private copy goes to the temp directory: when that disk fills up, the export
    says the disk is full (not that the palace is damaged), leaves no copy and no bundle behind, and
    the same command works once there is room."""
    disk, _grow = small_disk
    palace, out = tmp_path / "p", tmp_path / "b"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    free = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (free.f_bavail * free.f_frsize - 1024 * 1024))  # room for all but chroma.sqlite3
    proc = run_cli("export", "--palace", palace, "--out", out, env={"TMPDIR": str(disk)}, check=1)
    assert "disk is full" in proc.stderr and "damaged" not in proc.stderr and "Traceback" not in proc.stderr
    assert f"private copy of the palace in {disk}" in proc.stderr and "TMPDIR" in proc.stderr
    assert [p.name for p in disk.iterdir()] == ["filler"] and not list(out.glob("palace-*"))
    (disk / "filler").unlink()
    run_cli("export", "--palace", palace, "--out", out, env={"TMPDIR": str(disk)})
    assert len(list(out.glob("palace-*"))) == 1 and [p.name for p in disk.iterdir()] == []


def test_item09_a_sync_whose_temp_disk_has_no_room_reads_without_a_copy(small_disk, tmp_path):
    """A sync reads the rows it carries from a private copy in the temp directory when that is faster
    (``read_view``). A temp disk without room for one is no reason to fail, nor to fill it: the sync
    reads through the palace's own store instead, converges, and leaves the disk as it found it."""
    disk, _grow = small_disk
    a, b = tmp_path / "a", tmp_path / "b"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    free = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (free.f_bavail * free.f_frsize - 1024 * 1024))
    r = json.loads(run_cli("sync", a, b, "--json", env={"TMPDIR": str(disk)}).stdout)
    assert r["converged"] and r["moved"] > 300
    assert [p.name for p in disk.iterdir()] == ["filler"]


def cut_short_palace(palace: Path) -> Path:
    """A palace past Chroma's sync_threshold (1000 rows, so its index persisted a pickle) whose pickle a
    write stopped by a full disk left empty."""
    make_palace(palace, {f"d{i:04d}": (f"memory number {i} about topic {i % 17}", {"wing": "w", "room": "r"})
                         for i in range(1200)})
    write_sidecar(palace, EmbedderIdentity("minilm", 384))  # true after a repair: it re-embeds every text
    (pickle,) = palace.glob("*/index_metadata.pickle")
    pickle.write_bytes(b"")
    return palace


def test_item09_an_index_file_cut_short_is_named_with_a_non_destructive_remedy(tmp_path):
    palace = cut_short_palace(tmp_path / "p")
    for verb in (["status", "--palace", palace, "--probes", "3"], ["export", "--palace", palace, "--out", tmp_path / "b"]):
        proc = run_cli(*verb, check=1)
        assert "index_metadata.pickle is empty" in proc.stderr and "Traceback" not in proc.stderr
        assert "repair rebuild-index" in proc.stderr and "--force" not in proc.stderr


@pytest.mark.slow
def test_item09_the_advised_remedy_repairs_the_palace(tmp_path):
    import subprocess

    from .helpers import BIN

    palace = cut_short_palace(tmp_path / "p")
    fix = subprocess.run([str(BIN / "mempalace"), "--palace", str(palace), "repair", "rebuild-index"],
                         capture_output=True, text=True, timeout=900, input="y\n")
    assert fix.returncode == 0, fix.stdout + fix.stderr
    assert cli_json("status", "--palace", palace, "--probes", "20")["drawers"] == 1200

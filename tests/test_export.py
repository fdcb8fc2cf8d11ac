"""Backup bundles: verified, incremental, restorable; and the human-readable formats."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.embed import EmbedderIdentity
from exporters.bundle import _hash_record
from exporters.retention import select
from palace.bundles import bundle_state, list_bundles, state_batch
from palace.errors import PalaceEtlError
from palace.hashed import MAX_AGE
from palace.kg import KnowledgeGraph
from palace.layout import layout_for, write_sidecar
from palace.manifest import Manifest
from palace.vectors import VectorStore

from .helpers import SAMPLE, cli_json, flip_a_byte, kg_rows, palace_rows, run_cli


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def snapshot(palace: Path) -> dict:
    """Everything a restore must reproduce: drawers and closets with vectors, and both KG tables."""
    kg = palace / "knowledge_graph.sqlite3"
    return {"drawers": palace_rows(palace, vectors=True), "closets": palace_rows(palace, "mempalace_closets", True),
            "entities": kg_rows(kg, "entities") if kg.exists() else [],
            "triples": kg_rows(kg, "triples") if kg.exists() else []}


def same_metadata(x: dict, y: dict) -> bool:
    """Equal metadata; floats to 1e-12 relative: Chroma 1.5.9 stores float metadata through SQLite text
    conversion, which may move the last bit on every write (seen: ...894e-22 -> ...895e-22)."""
    import math

    return x.keys() == y.keys() and all(
        math.isclose(x[k], y[k], rel_tol=1e-12) if isinstance(x[k], float) and isinstance(y[k], float)
        else x[k] == y[k] and type(x[k]) is type(y[k]) for k in x)


def assert_same(a: dict, b: dict) -> None:
    for table in ("drawers", "closets"):
        assert a[table].keys() == b[table].keys(), table
        for i, row in a[table].items():
            other = b[table][i]
            assert row["document"] == other["document"] and same_metadata(row["metadata"], other["metadata"]), i
            assert np.abs(np.array(row["embedding"]) - np.array(other["embedding"])).max() <= 1e-6
    assert a["entities"] == b["entities"] and a["triples"] == b["triples"]


def add_closets(palace: Path, n: int = 5) -> None:
    store = VectorStore(layout_for(palace), collection="mempalace_closets")
    store.upsert([f"closet_mcp_memory_x_{i:02d}" for i in range(n)], [f"topic {i}|ents|→drawer_{i}" for i in range(n)],
                 [{"wing": "mcp_memory", "room": "x", "drawer_count": i} for i in range(n)], unit(n, 5))
    store.close()


def sample_with_closets(p: Path) -> Path:
    cli_json("import", "mcp-memory", SAMPLE, "--palace", p)
    add_closets(p)
    return p


@pytest.fixture(scope="module")
def sample_palace(tmp_path_factory) -> Path:
    return sample_with_closets(tmp_path_factory.mktemp("sample") / "palace")


def test_round_trip(sample_palace, tmp_path):
    out = tmp_path / "backups"
    r = cli_json("export", "--palace", sample_palace, "--out", out)
    assert r["kind"] == "full" and r["counts"]["drawers"] == 363 and r["counts"]["closets"] == 5
    bundle = Path(r["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["embedder"] == {"model_name": "minilm", "dimension": 384}
    assert manifest["collections"]["drawers"]["hnsw:space"] == "cosine"
    assert set(manifest["files"]) >= {"drawers.parquet", "closets.parquet", "entities.parquet", "triples.parquet",
                                      "state.parquet", "tombstones.parquet", "sidecars/mempalace_embedder.json"}
    run_cli("verify", "--bundle", bundle)
    target = tmp_path / "restored"
    cli_json("restore", bundle, "--palace", target)
    assert_same(snapshot(sample_palace), snapshot(target))
    run_cli("verify", "--palace", target, "--against", "mcp-memory", SAMPLE)
    assert (target / "mempalace_embedder.json").read_bytes() == (sample_palace / "mempalace_embedder.json").read_bytes()


def test_files_are_private_and_no_temp_dirs_remain(sample_palace, tmp_path):
    out = tmp_path / "backups"
    bundle = Path(cli_json("export", "--palace", sample_palace, "--out", out)["bundle"])
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    for p in bundle.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o600 if p.is_file() else 0o700), p
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp")] == []


def test_refuses_to_write_through_a_symlink(sample_palace, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    proc = run_cli("export", "--palace", sample_palace, "--out", tmp_path / "link" / "backups", check=1)
    assert "symlink" in proc.stderr and not any(real.iterdir())


@pytest.mark.parametrize("victim", ["manifest.json", "drawers.parquet", "closets.parquet", "entities.parquet",
                                    "triples.parquet", "state.parquet", "tombstones.parquet",
                                    "sidecars/mempalace_embedder.json"])
def test_one_flipped_byte_is_named_and_nothing_is_written(sample_palace, tmp_path, victim):
    bundle = Path(cli_json("export", "--palace", sample_palace, "--out", tmp_path / "b")["bundle"])
    flip_a_byte(bundle / victim)
    target = tmp_path / "restored"
    proc = run_cli("restore", bundle, "--palace", target, check=1)
    assert (victim in proc.stderr) and not target.exists()
    report = json.loads(run_cli("verify", "--bundle", bundle, "--json", check=4).stdout)
    assert any(victim in f["message"] for f in report["findings"])


def test_an_incremental_re_reads_a_parent_file_changed_since_this_machine_hashed_it(sample_palace, tmp_path):
    """The nightly check of the chain an incremental extends skips a file only when this machine
    hashed it to the manifest's sha256 within a week, and its size, mtime and ctime are unchanged
    since; a byte changed in place with its mtime set back is read again. ``verify`` never skips,
    and once it finds a bundle damaged, the next export re-reads the chain (its remedy works), even
    when an export that loaded the record before ends after the verify."""
    out = tmp_path / "backups"
    full = Path(cli_json("export", "--palace", sample_palace, "--out", out)["bundle"])
    digests = Manifest.load(full).files
    record_file = _hash_record(out).path
    assert stat.S_IMODE(record_file.stat().st_mode) == 0o600 and stat.S_IMODE(record_file.parent.stat().st_mode) == 0o700
    record = json.loads(record_file.read_bytes())
    assert sorted(e[3] for e in record.values()) == sorted(digests.values())

    victim = full / "drawers.parquet"
    before = victim.stat()
    flip_a_byte(victim)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime: only ctime moved
    r = cli_json("export", "--palace", sample_palace, "--out", out, "--incremental")
    assert r["kind"] == "full" and "drawers.parquet" in r["full_because"] and "sha256" in r["full_because"], r

    # Vouch in the record for changed bytes: export trusts what it hashed within a week, verify never.
    newest = Path(r["bundle"])
    victim = newest / "drawers.parquet"
    flip_a_byte(victim)

    def vouch(age: float) -> None:
        st, record = victim.stat(), json.loads(record_file.read_bytes())
        record[f"{st.st_dev}:{st.st_ino}"] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                              Manifest.load(newest).files["drawers.parquet"], time.time() - age]
        record_file.write_bytes(json.dumps(record).encode())

    vouch(MAX_AGE + 60)
    dry = cli_json("export", "--palace", sample_palace, "--out", out, "--incremental", "--dry-run")
    assert dry["kind"] == "full" and "drawers.parquet" in dry["full_because"], dry
    vouch(0)
    assert cli_json("export", "--palace", sample_palace, "--out", out, "--incremental", "--dry-run")["kind"] == \
        "incremental"
    running = _hash_record(out)  # an export that loaded the record and trusted it, still running
    expect = Manifest.load(newest).files["drawers.parquet"]
    assert running.sha256(victim, expect) == expect
    report = json.loads(run_cli("verify", "--bundle", newest, "--json", check=4).stdout)
    assert any("drawers.parquet" in f["message"] for f in report["findings"])
    running.save()  # it ends after verify dropped the record: it must not save the record back
    r = cli_json("export", "--palace", sample_palace, "--out", out, "--incremental")
    assert r["kind"] == "full" and "drawers.parquet" in r["full_because"], r


def _mutate(palace: Path, night: int) -> None:
    """One night of changes: add, edit, delete drawers and triples; invalidate a triple."""
    store = VectorStore(layout_for(palace))
    ids = sorted(palace_rows(palace))
    store.upsert([f"drawer_night{night}_{i}" for i in range(20)], [f"night {night} memory {i}" for i in range(20)],
                 [{"wing": "nightly", "room": f"n{night}"}] * 20, unit(20, night))
    store.upsert(ids[night * 3:night * 3 + 3], [f"edited on night {night}"] * 3, [{"wing": "mcp_memory", "room": "x"}] * 3,
                 unit(3, 100 + night))
    store.delete(ids[-(night + 1) * 4:][:4])
    store.close()
    with KnowledgeGraph(palace / "knowledge_graph.sqlite3") as kg:
        kg.write_batch([], [(f"t_night_{night}", f"Night {night}", "saw", "moon", None, None, 1.0, None, None, "t")])
        first = kg.query("SELECT id FROM triples WHERE valid_to IS NULL ORDER BY id LIMIT 1")[0][0]
        kg.execute_write("UPDATE triples SET valid_to = '2026-11-2%d' WHERE id = ?" % night, (first,))
        victim = kg.query("SELECT id FROM triples ORDER BY id DESC LIMIT 1")[0][0]
        kg.execute_write("DELETE FROM triples WHERE id = ?", (victim,))


def test_three_nights_of_incrementals_restore_like_a_full_export(tmp_path):
    palace, out = tmp_path / "palace", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    first = cli_json("export", "--palace", palace, "--out", out, "--incremental")
    assert first["kind"] == "full"
    for night in (1, 2, 3):
        _mutate(palace, night)
        r = cli_json("export", "--palace", palace, "--out", out, "--incremental")
        assert r["kind"] == "incremental" and r["deleted"] == 5  # 4 drawers + 1 triple
        assert r["counts"]["drawers"] == 23 and r["counts"]["triples"] == 2
        assert r["rehashed_because"] is None  # found by Chroma's change marks, not by re-reading every row
    unchanged = cli_json("export", "--palace", palace, "--out", out, "--incremental")
    assert sum(unchanged["counts"].values()) == 0 and unchanged["deleted"] == 0
    latest = list_bundles(out)[-1]
    chained = tmp_path / "from-chain"
    assert cli_json("restore", latest, "--palace", chained)["chain"][0].endswith("-full")
    full = Path(cli_json("export", "--palace", palace, "--out", tmp_path / "full")["bundle"])
    direct = tmp_path / "from-full"
    cli_json("restore", full, "--palace", direct)
    want = snapshot(palace)
    assert_same(want, snapshot(chained))
    assert_same(want, snapshot(direct))


def test_change_marks_find_what_a_full_rehash_finds_and_are_not_trusted_past_a_swap(tmp_path):
    """An incremental finds the changed rows by each row's last write (Chroma's ``seq_id``) instead of
    re-reading every row. A metadata-only update counts; a palace swapped for an older copy of itself
    (same collections, other history) or restored (new collections) still gives a bundle that is the
    palace, and the report says when every row was re-read."""
    import shutil

    from palace.stores import open_store

    palace, out, older = tmp_path / "palace", tmp_path / "backups", tmp_path / "older"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    shutil.copytree(palace, older)
    first = cli_json("export", "--palace", palace, "--out", out, "--incremental")
    assert first["kind"] == "full" and first["rehashed_because"] is None
    ids = sorted(palace_rows(palace))
    col = VectorStore(layout_for(palace))
    with col.writing() as c:
        c.update(ids=ids[:2], metadatas=[{"room": "moved"}] * 2)  # no text, no vector: only metadata
    col.close()
    moved = cli_json("export", "--palace", palace, "--out", out, "--incremental")
    assert moved["counts"]["drawers"] == 2 and moved["rehashed_because"] is None

    store = open_store(palace, read_only=True)
    try:
        known = store.snapshot()
        _, marks, _ = store.changes({}, None)
    finally:
        store.close()
    _mutate(palace, 1)
    store = open_store(palace, read_only=True)
    try:
        state, _, why = store.changes(known, marks)
        assert why is None and state == store.snapshot()  # the same state, row for row
    finally:
        store.close()

    shutil.rmtree(palace)
    shutil.copytree(older, palace)  # the same collection ids, an older history
    swapped = cli_json("export", "--palace", palace, "--out", out, "--incremental")
    assert swapped["kind"] == "incremental" and swapped["counts"]["drawers"] == 2  # the two moved back
    restored = tmp_path / "restored"
    cli_json("restore", list_bundles(out)[-1], "--palace", restored)
    assert_same(snapshot(palace), snapshot(restored))

    cli_json("restore", list_bundles(out)[-1], "--palace", palace, "--force")  # new collections
    again = cli_json("export", "--palace", palace, "--out", out, "--incremental")
    assert again["counts"]["drawers"] == 0 and "recreated" in again["rehashed_because"]


def test_a_prepared_reader_reads_the_palace_as_it_was_then(tmp_path):
    """``prepare``, the head start an export gives its reader in another thread while it checks the
    bundles, takes the reader's private copy and its vector index: every later read -- rows, hashes,
    vectors -- is the palace of that moment, whatever is written after."""
    import threading

    from palace.stores import open_store

    palace = tmp_path / "palace"
    ids = [f"drawer_{i:02d}" for i in range(12)]
    store = VectorStore(layout_for(palace))
    vectors = unit(12, 7)
    store.upsert(ids, [f"memory {i}" for i in ids], [{"wing": "w", "room": "r"}] * 12, vectors)
    reader = open_store(palace, read_only=True)
    try:
        head_start = threading.Thread(target=reader.prepare)
        head_start.start()
        head_start.join()
        store.upsert(["drawer_03"], ["memory 3, rewritten"], [{"wing": "w", "room": "r"}], unit(1, 8))
        store.delete(["drawer_07"])
        store.close()
        state = reader.snapshot()
        assert len(state["drawers"]) == 12 and "drawer_07" in state["drawers"]
        early, again = reader.marks(), reader.marks()  # read beside the copy, then from the copy itself
        assert early == again and len(early["rows"]["drawers"]) == 12
        (page,) = reader.fetch("drawers", ["drawer_03", "drawer_07"])
        assert [r["document"] for r in page] == ["memory drawer_03", "memory drawer_07"]
        assert np.allclose([r["embedding"] for r in page], vectors[[3, 7]], atol=1e-7)
    finally:
        reader.close()
    fresh = open_store(palace, read_only=True)
    try:
        assert len(fresh.snapshot()["drawers"]) == 11
    finally:
        fresh.close()


def test_change_marks_of_an_older_palace_are_its_seq_id_bytes(tmp_path):
    """Palaces written by Chroma 0.x keep ``embeddings.seq_id`` as big-endian bytes (MemPalace converts
    them only when it opens the palace for writing). Their marks are those bytes in hex, compared as
    they are: the one row rewritten with a new mark is the one re-read."""
    import sqlite3

    from palace.stores import open_store

    palace = tmp_path / "palace"
    ids = [f"drawer_{i:02d}" for i in range(12)]
    store = VectorStore(layout_for(palace))
    store.upsert(ids, [f"memory {i}" for i in ids], [{"wing": "w", "room": "r"}] * 12, unit(12, 4))
    store.close()

    def rewrite(sql: str, rows) -> None:
        with sqlite3.connect(palace / "chroma.sqlite3") as conn:
            conn.executemany(sql, rows)
        conn.close()

    with sqlite3.connect(palace / "chroma.sqlite3") as conn:
        seqs = conn.execute("SELECT id, seq_id FROM embeddings").fetchall()
    conn.close()
    rewrite("UPDATE embeddings SET seq_id = ? WHERE id = ?", [(seq.to_bytes(8, "big"), rowid) for rowid, seq in seqs])
    store = open_store(palace, read_only=True)
    try:
        known, marks, _ = store.changes({}, None)
    finally:
        store.close()
    assert all(isinstance(m, str) and len(m) == 16 for m in marks["rows"]["drawers"].values())
    rewrite("UPDATE embedding_metadata SET string_value = 'memory 3, rewritten' WHERE key = 'chroma:document' AND id = "
            "(SELECT id FROM embeddings WHERE embedding_id = ?)", [("drawer_03",)])
    rewrite("UPDATE embeddings SET seq_id = ? WHERE embedding_id = ?", [((10 ** 6).to_bytes(8, "big"), "drawer_03")])
    rewrite("DELETE FROM embeddings WHERE embedding_id = ?", [("drawer_07",)])
    store = open_store(palace, read_only=True)
    read: list[str] = []
    real = store._copy()._hashes
    store._copy()._hashes = lambda table, got: (read.extend(got), real(table, got))[1]
    try:
        state, _, why = store.changes(known, marks)
        assert why is None and read == ["drawer_03"] and state == store.snapshot()
        assert "drawer_07" not in state["drawers"] and len(state["drawers"]) == 11
    finally:
        store.close()


def test_full_bundle_every_n(tmp_path):
    palace, out = tmp_path / "palace", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    kinds = [cli_json("export", "--palace", palace, "--out", out, "--incremental", "--full-every", "3")["kind"]
             for _ in range(5)]
    assert kinds == ["full", "incremental", "incremental", "full", "incremental"]


def test_retention_keeps_what_kept_bundles_need(tmp_path):
    palace, out = tmp_path / "palace", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    for _ in range(4):
        cli_json("export", "--palace", palace, "--out", out, "--incremental", "--full-every", "10")
    names = [b.name for b in list_bundles(out)]
    r = cli_json("export", "--palace", palace, "--out", out, "--incremental", "--keep", "1")
    # the newest incremental needs the whole chain back to the full bundle: nothing may go
    assert r["removed_by_retention"] == [] and len(list_bundles(out)) == 5
    cli_json("export", "--palace", palace, "--out", out, "--keep", "1")  # a fresh full bundle
    assert [b.name for b in list_bundles(out)][-1].endswith("-full") and len(list_bundles(out)) == 1
    assert not set(names) & {b.name for b in list_bundles(out)}
    fake = []
    for d in range(1, 8):  # one full bundle a day, plus a second one on day 7
        for hh in ("03", "04") if d == 7 else ("03",):
            b = tmp_path / "days" / f"palace-2026110{d}T{hh}0000000000Z-full"
            b.mkdir(parents=True)
            (b / "manifest.json").write_bytes(Manifest(b.name, "full", "", "", None, {}).to_json())
            fake.append(b)
    kept = sorted(b.name[13:18] for b in select(fake, daily=3))
    assert kept == ["05T03", "06T03", "07T04"]  # the newest bundle of each of the last 3 days


def test_overlapping_runs_are_refused(sample_palace, tmp_path):
    out = tmp_path / "backups"
    out.mkdir()
    code = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid 4242'); f.flush(); print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / ".export.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("export", "--palace", sample_palace, "--out", out, check=11)
        assert "already running" in proc.stderr and "pid 4242" in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def foreign_rows(rows: dict) -> list[str]:
    """Ids of restored rows that neither the base palace nor the live writer (tests.workers) wrote."""
    def expected(i: str) -> str | None:
        if i.startswith("base_"):
            return f"base {i[5:]}"
        if i.startswith("drawer_stress_live_"):
            return f"live memory {int(i.rsplit('_', 1)[1])}"
        return None
    return sorted(i for i, r in rows.items() if r["document"] != expected(i))


@settings(max_examples=60, deadline=None)
@given(state=st.dictionaries(st.sampled_from(["drawers", "closets", "entities", "triples"]),
                             st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=6)),
       seed=st.integers(0, 2**32 - 1))
def test_a_bundle_state_reads_back_in_any_row_order(tmp_path_factory, state, seed):
    """``bundle_state`` cuts the state file into tables where the name changes; rows of one table
    need not be together (a file from another writer), and a table with no rows is no table."""
    d = tmp_path_factory.mktemp("state")
    table = pa.Table.from_batches([state_batch(state)])
    table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
    pq.write_table(table, d / "state.parquet")
    assert bundle_state(d) == {t: rows for t, rows in state.items() if rows}


def test_foreign_row_check_catches_every_row_not_only_the_first():
    """Planted defect for the check above: a bad row that sorts last is still found."""
    good = {"base_0": {"document": "base 0"}, "drawer_stress_live_000007": {"document": "live memory 7"}}
    assert foreign_rows(good) == []
    assert foreign_rows({**good, "zzz_intruder": {"document": "x"}}) == ["zzz_intruder"]
    assert foreign_rows({**good, "base_9": {"document": "edited"}}) == ["base_9"]


def test_export_while_another_process_writes(tmp_path):
    palace, out = tmp_path / "palace", tmp_path / "backups"
    store = VectorStore(layout_for(palace))
    store.upsert([f"base_{i}" for i in range(3000)], [f"base {i}" for i in range(3000)],
                 [{"wing": "w", "room": "r"}] * 3000, unit(3000, 1))
    store.close()
    write_sidecar(palace, EmbedderIdentity("random-test-vectors", 384))  # honest: these are not MiniLM vectors
    writer = subprocess.Popen([sys.executable, "-m", "tests.workers", "drawers", str(palace), "live", "2000", "50", "9"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bundles = []
    while writer.poll() is None or not bundles:
        bundles.append(Path(cli_json("export", "--palace", palace, "--out", out, "--lock-timeout", "120")["bundle"]))
    out_, err = writer.communicate()
    assert writer.returncode == 0 and json.loads(out_.splitlines()[-1])["errors"] == 0, err
    for bundle in bundles:  # every bundle taken while the writer ran: whole, and only rows the palace held
        run_cli("verify", "--bundle", bundle)
        held = pq.read_table(bundle / "drawers.parquet", columns=["id", "document"]).to_pylist()
        rows = {r["id"]: r for r in held}
        assert foreign_rows(rows) == []  # every row is one the palace held, with its own text
        assert sum(k.startswith("base_") for k in rows) == 3000
        assert Manifest.load(bundle).counts["drawers"] == len(held) == len(rows) >= 3000
    # Restored: the first, a middle and the last (a restore takes seconds; what it loads is checked above).
    for i in sorted({0, len(bundles) // 2, len(bundles) - 1}):
        target = tmp_path / f"r{i}"
        restored = cli_json("restore", bundles[i], "--palace", target)
        rows = palace_rows(target)
        assert foreign_rows(rows) == [] and sum(k.startswith("base_") for k in rows) == 3000
        assert restored["rows"]["drawers"] == len(rows) >= 3000
        run_cli("verify", "--palace", target)


def _export_in_process(palace: Path, out: Path, copied: list) -> dict:
    """``export --incremental`` as the CLI runs it, in this process, where ``copied`` (filled by a spy
    on ``chroma_sqlite.copy_db``) shows whether ``chroma.sqlite3`` was copied."""
    from exporters.bundle import export_bundle
    from palace.stores import open_store

    copied.clear()
    store = open_store(palace, read_only=True, lock_timeout=120)
    try:
        r = export_bundle(store, out, incremental=True)
    finally:
        store.close()
    return {"kind": r.kind, "bundle": Path(r.bundle), "copied_db": any(Path(a[0]).name == "chroma.sqlite3" for a in copied)}


@pytest.fixture
def copy_spy(monkeypatch) -> list:
    from palace import chroma_sqlite

    calls, real = [], chroma_sqlite.copy_db
    monkeypatch.setattr(chroma_sqlite, "copy_db", lambda *a: calls.append(a) or real(*a))
    return calls


def test_incrementals_beside_a_writer_read_the_changes_live_and_copy_only_the_index(tmp_path, copy_spy):
    """A nightly incremental does not copy ``chroma.sqlite3``: the changed rows are read from the live
    file in one read transaction, with their vectors from a copy of the index alone (retaken when the
    index moved meanwhile). Taken again and again while another process writes, each bundle holds
    every row with its own text and its own vector, and the chain restores to the palace."""
    from .workers import unit_vectors

    palace, out = tmp_path / "palace", tmp_path / "backups"
    store = VectorStore(layout_for(palace))
    base = unit(3000, 1)
    store.upsert([f"base_{i}" for i in range(3000)], [f"base {i}" for i in range(3000)],
                 [{"wing": "w", "room": "r"}] * 3000, base)
    store.close()
    write_sidecar(palace, EmbedderIdentity("random-test-vectors", 384))
    assert _export_in_process(palace, out, copy_spy)["kind"] == "full"
    # 1,200 rows: Chroma persists its index once, at 1,000, while the exports run
    writer = subprocess.Popen([sys.executable, "-m", "tests.workers", "drawers", str(palace), "live", "1200", "50", "9"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nights = []
    while writer.poll() is None or len(nights) < 2:
        nights.append(_export_in_process(palace, out, copy_spy))
    out_, err = writer.communicate()
    assert writer.returncode == 0 and json.loads(out_.splitlines()[-1])["errors"] == 0, err
    nights.append(_export_in_process(palace, out, copy_spy))  # after the last write
    incrementals = [n for n in nights if n["kind"] == "incremental"]
    assert len(incrementals) >= 2 and not any(n["copied_db"] for n in incrementals)
    wrote = unit_vectors(9, 1200)
    for night in incrementals:
        run_cli("verify", "--bundle", night["bundle"])
        held = night["bundle"] / "drawers.parquet"  # none in a bundle of a night with no drawer written
        for row in pq.read_table(held).to_pylist() if held.exists() else []:
            k = int(row["id"].rsplit("_", 1)[1])
            want = base[k] if row["id"].startswith("base_") else wrote[k]
            assert row["document"] in (f"base {k}", f"live memory {k}"), row["id"]
            assert np.abs(np.asarray(row["embedding"], dtype=np.float32) - want).max() <= 1e-6, row["id"]
    restored = tmp_path / "restored"
    cli_json("restore", nights[-1]["bundle"], "--palace", restored)
    assert_same(snapshot(palace), snapshot(restored))


def test_an_incremental_of_many_changes_or_a_moving_index_reads_a_whole_copy(tmp_path, copy_spy, monkeypatch):
    """The live read is for a night's few changes: more than ``LIVE_ROWS`` changed rows are read from
    a whole private copy instead, as before. An index that moved while it was read is copied again.
    Either way the chain restores to the palace, and rows beyond what the live read read are refused."""
    from palace import chroma_sqlite
    from palace.stores import chroma_dir, open_store

    palace, out = tmp_path / "palace", tmp_path / "backups"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    _export_in_process(palace, out, copy_spy)
    _mutate(palace, 1)  # 23 drawers written
    monkeypatch.setattr(chroma_dir, "LIVE_ROWS", 22)
    many = _export_in_process(palace, out, copy_spy)
    assert many["kind"] == "incremental" and many["copied_db"]
    assert Manifest.load(many["bundle"]).counts["drawers"] == 23

    monkeypatch.setattr(chroma_dir, "LIVE_ROWS", 23)
    _mutate(palace, 2)
    real, stamps = chroma_dir._segment_stamps, []

    def moving(path):  # the index moves under the first live read
        stamps.append(path)
        return {**real(path), "torn": (len(stamps), 0)} if len(stamps) <= 2 else real(path)

    monkeypatch.setattr(chroma_dir, "_segment_stamps", moving)
    monkeypatch.setattr(chroma_sqlite, "RACY_NS", 0)  # the files just written are not what this is about
    moved = _export_in_process(palace, out, copy_spy)
    assert moved["kind"] == "incremental" and not moved["copied_db"] and len(stamps) == 4
    assert Manifest.load(moved["bundle"]).counts["drawers"] == 23
    restored = tmp_path / "restored"
    cli_json("restore", moved["bundle"], "--palace", restored)
    assert_same(snapshot(palace), snapshot(restored))

    reader = open_store(palace, read_only=True)
    try:
        known = bundle_state(moved["bundle"])
        marks = reader.marks()
        reader.close()
        reader = open_store(palace, read_only=True)
        reader.prepare(changes=True)
        state, _, why = reader.changes(known, marks)
        assert why is None and state["drawers"] == known["drawers"]
        with pytest.raises(PalaceEtlError, match="beyond the changes read"):
            list(reader.fetch("drawers", sorted(known["drawers"])[:1]))
    finally:
        reader.close()


metadata_values = st.one_of(st.text(max_size=20), st.integers(-10**9, 10**9), st.booleans(),
                            st.floats(allow_nan=False, allow_infinity=False, width=32))


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.dictionaries(st.text("abcdefghij_", min_size=1, max_size=12), st.tuples(
    st.text(min_size=0, max_size=80), st.dictionaries(st.sampled_from(["wing", "room", "k1", "k2", "n"]),
                                                      metadata_values, min_size=1, max_size=4)),
    min_size=1, max_size=40),
    triples=st.lists(st.tuples(st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10)), max_size=10))
def test_round_trip_of_random_palaces(tmp_path_factory, rows, triples):
    base = tmp_path_factory.mktemp("rand")
    palace = base / "palace"
    ids = sorted(rows)
    store = VectorStore(layout_for(palace))
    store.upsert(ids, [rows[i][0] for i in ids], [rows[i][1] for i in ids], unit(len(ids), len(ids)))
    store.close()
    with KnowledgeGraph(palace / "knowledge_graph.sqlite3") as kg:
        kg.write_batch([], [(f"t_{k}", s, "rel", o, None, None, 0.5, None, None, "h") for k, (s, o) in enumerate(triples)])
    bundle = cli_json("export", "--palace", palace, "--out", base / "b")["bundle"]
    cli_json("restore", bundle, "--palace", base / "r")
    assert_same(snapshot(palace), snapshot(base / "r"))


def test_restore_refuses_a_non_empty_target_unless_forced(sample_palace, tmp_path):
    bundle = cli_json("export", "--palace", sample_palace, "--out", tmp_path / "b")["bundle"]
    target = tmp_path / "t"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", target, "--wing", "other")
    proc = run_cli("restore", bundle, "--palace", target, check=1)
    assert "--force" in proc.stderr
    r = cli_json("restore", bundle, "--palace", target, "--force")
    assert Path(r["replaced"]).exists()  # the old palace is kept aside, not deleted
    assert set(cli_json("status", "--palace", target)["wings"]) == {"mcp_memory"}


def test_human_formats(sample_palace, tmp_path):
    r = cli_json("export", "--palace", sample_palace, "--out", tmp_path / "j", "--format", "jsonl")
    assert r["drawers"] == 363
    lines = (tmp_path / "j" / "mcp_memory" / "person.jsonl").read_text().splitlines()
    recs = [json.loads(l) for l in lines]
    assert [x["id"] for x in recs] == sorted(x["id"] for x in recs) and len(recs) == 27
    assert set(recs[0]) == {"id", "document", "metadata"} and recs[0]["metadata"]["room"] == "person"
    cli_json("export", "--palace", sample_palace, "--out", tmp_path / "m", "--format", "markdown")
    index = (tmp_path / "m" / "index.md").read_text()
    assert "| mcp_memory |" in index and "[person](mcp_memory/person.md)" in index
    md = (tmp_path / "m" / "mcp_memory" / "person.md").read_text()
    assert md.startswith("# mcp_memory / person") and md.count("\n## drawer_mcp_memory_person_") == 27


COMPARE = """
import chromadb, numpy as np
a = chromadb.PersistentClient({a!r}).get_collection("mempalace_drawers")
b = chromadb.PersistentClient({b!r}).get_collection("mempalace_drawers")
inc = ["documents", "metadatas", "embeddings"]
diff = {{"count": [a.count(), b.count()], "missing": 0, "changed": 0, "max_abs": 0.0}}
for off in range(0, a.count(), 2000):
    x = a.get(include=inc, limit=2000, offset=off)
    y = b.get(ids=x["ids"], include=inc)
    ym = dict(zip(y["ids"], zip(y["documents"], y["metadatas"], y["embeddings"])))
    for i, d, m, e in zip(x["ids"], x["documents"], x["metadatas"], x["embeddings"]):
        if i not in ym:
            diff["missing"] += 1
            continue
        diff["changed"] += (d, m) != ym[i][:2]
        diff["max_abs"] = max(diff["max_abs"], float(np.abs(np.asarray(e) - np.asarray(ym[i][2])).max()))
emit(diff)
"""


@pytest.mark.slow
def test_round_trip_of_a_20k_drawer_palace(tmp_path):
    from .helpers import run_python

    palace = tmp_path / "palace"
    store = VectorStore(layout_for(palace))
    n = 20_000
    vecs = unit(n, 20)
    for s in range(0, n, 5000):
        ids = [f"drawer_big_{i:06d}" for i in range(s, s + 5000)]
        store.upsert(ids, [f"memory number {i} " * (1 + i % 5) for i in range(s, s + 5000)],
                     [{"wing": f"w{i % 15}", "room": f"r{i % 8}", "chunk_index": i, "score": i / 7, "pinned": i % 2 == 0}
                      for i in range(s, s + 5000)], vecs[s:s + 5000])
    store.close()
    bundle = cli_json("export", "--palace", palace, "--out", tmp_path / "b")["bundle"]
    assert cli_json("restore", bundle, "--palace", tmp_path / "r")["rows"]["drawers"] == n
    diff = run_python(COMPARE.format(a=str(palace), b=str(tmp_path / "r")))
    assert diff == {"count": [n, n], "missing": 0, "changed": 0, "max_abs": diff["max_abs"]}
    assert diff["max_abs"] <= 1e-6

"""Cross-machine sync: replicas converge, deletes included, nothing re-embedded."""
from __future__ import annotations

import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from etl.embed import EmbedderIdentity
from etl.sync import run_sync
from palace.bundles import list_bundles
from palace.kg import KnowledgeGraph
from palace.layout import layout_for, write_sidecar
from palace.stores import open_store
from palace.vectors import VectorStore

from .helpers import SAMPLE, cli_json, copy_kg, copy_palace_files, put_kg_back, run_cli


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def state(spec: str, kg: Path | None = None) -> dict:
    r = open_store(spec, kg)
    try:
        return r.snapshot()
    finally:
        r.close()


def edit(spec: str, kg: Path | None, rng: random.Random, tag: str, embed) -> list[str]:
    """Random adds, edits and deletes of drawers and triples on one replica (real MiniLM vectors),
    through its own store; returns the ids it deleted."""
    store = open_store(spec, kg)
    try:
        ids = sorted(store.snapshot()["drawers"])
        new = [f"drawer_{tag}_{k}" for k in range(rng.randint(3, 8))]
        docs = [f"{tag} added {k}" for k in range(len(new))]
        store.write("drawers", [{"id": i, "document": d, "embedding": v, "metadata": {
            "wing": "sync", "room": tag, "last_modified": f"2020-01-01T0{k}:00:00"}}
            for k, (i, d, v) in enumerate(zip(new, docs, embed(docs)))])
        changed = rng.sample(ids, min(3, len(ids)))
        docs = [f"{tag} edited {i}" for i in changed]
        store.write("drawers", [{"id": i, "document": d, "embedding": v, "metadata": {
            "wing": "sync", "room": tag, "last_modified": "2020-01-01T12:00:00"}}
            for i, d, v in zip(changed, docs, embed(docs))])
        gone = rng.sample(sorted(set(ids) - set(changed)), min(2, len(ids)))
        store.delete("drawers", gone)
        store.commit()
        kg_path = store.kg_path
    finally:
        store.close()
    with KnowledgeGraph(kg_path) as g:
        g.write_batch([], [(f"t_{tag}", f"{tag} node", "syncs_with", "palace", None, None, 1.0, None, None, "t")])
    return gone


def resurrected(deleted: set[str], *replicas: tuple[str, Path | None]) -> dict[str, list[str]]:
    """{replica: deleted ids it holds again}; empty when no deleted drawer came back anywhere."""
    out = {}
    for spec, kg in replicas:
        back = sorted(deleted & state(spec, kg)["drawers"].keys())
        if back:
            out[spec] = back
    return out


def converged(*replicas: tuple[str, Path | None]) -> bool:
    states = [state(s, k) for s, k in replicas]
    return all(st == states[0] for st in states[1:])


@pytest.mark.parametrize("seed,middle", [(7, "chroma"), (7, "pgvector"), pytest.param(11, "chroma", marks=pytest.mark.slow)])
def test_three_replicas_converge_and_nothing_is_re_embedded(tmp_path, chroma_server, monkeypatch, embedder, seed,
                                                            middle, request):
    """A palace directory, B (a palace directory, or a pgvector palace on PostgreSQL) and a Chroma
    server: random edits on all three, syncs in changing orders; they converge, deletes stay deleted."""
    import etl.embed

    embed = embedder.embed  # the edits' own vectors are made before sync is forbidden to embed

    def no_embedding(*a, **k):
        raise AssertionError("sync must never build an embedder")

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    if middle == "pgvector":
        monkeypatch.setenv("MEMPALACE_PGVECTOR_DSN", request.getfixturevalue("postgres"))
        b = f"pgvector:{b}"
    c, kg_c = chroma_server, tmp_path / "c-kg" / "knowledge_graph.sqlite3"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)  # the one import that embeds; from here on none may
    monkeypatch.setattr(etl.embed.MiniLMEmbedder, "__init__", no_embedding)
    reps = [(a, None), (b, None), (c, kg_c)]
    rng = random.Random(seed)
    first = run_sync(a, b)
    assert first.converged and first.plan["to_b"]["drawers"] == 363
    assert run_sync(b, c, kg_b=kg_c).converged
    deleted: set[str] = set()
    for rnd in range(3):
        for k, (spec, kg) in enumerate(reps):
            deleted |= set(edit(spec, kg, rng, f"r{rnd}x{k}", embed))
        order = [(0, 1), (1, 2), (2, 0), (0, 1)] if rnd % 2 == 0 else [(2, 1), (1, 0), (0, 2), (2, 1)]
        for i, j in order:
            r = run_sync(reps[i][0], reps[j][0], kg_a=reps[i][1], kg_b=reps[j][1], max_delete=100)
            assert r.converged, r.differences
        assert converged(*reps)
    assert deleted and resurrected(deleted, *reps) == {}  # no deleted drawer came back anywhere
    monkeypatch.undo()  # verify's retrieval probes embed the documents: that is verify's work, not sync's
    if middle == "pgvector":
        monkeypatch.setenv("MEMPALACE_PGVECTOR_DSN", request.getfixturevalue("postgres"))
    for spec, kg in reps[:2]:
        run_cli("verify", "--palace", spec)
    # a second sync with no changes moves nothing
    again = run_sync(a, b)
    assert again.moved == 0 and again.plan == {k: {} for k in again.plan} and again.converged
    assert again.rehashed == {}  # both found by their change marks: nothing re-read


def test_resurrection_check_catches_a_deleted_drawer_that_came_back(tmp_path):
    """Planted defect for the check above: a drawer deleted and then written back is reported."""
    a = str(tmp_path / "a")
    store = VectorStore(layout_for(a))
    store.upsert(["keep", "gone"], ["k", "g"], [{"wing": "w", "room": "r"}] * 2, unit(2, 1))
    store.delete(["gone"])
    assert resurrected({"gone"}, (a, None)) == {}
    store.upsert(["gone"], ["g"], [{"wing": "w", "room": "r"}], unit(1, 2))  # the defect: it came back
    store.close()
    assert resurrected({"gone"}, (a, None)) == {a: ["gone"]}


def test_a_settled_conflict_stays_settled_when_the_loser_arrives_from_a_third_replica(tmp_path):
    """C edits a row it got from A, with a clock behind A's: causally C's version is newer. B learns it
    from C; A must then take it from either B or C, never win with its older version by timestamp."""
    a, b, c = (str(tmp_path / n) for n in "abc")

    def put(spec: str, doc: str, stamp: str, seed: int) -> None:
        store = VectorStore(layout_for(spec))
        store.upsert(["x"], [doc], [{"wing": "w", "room": "r", "last_modified": stamp}], unit(1, seed))
        store.close()

    def doc(spec: str) -> str:
        store = VectorStore(layout_for(spec))
        try:
            return store.get(["x"], include=("documents",))["documents"][0]
        finally:
            store.close()

    put(a, "x0", "2026-01-01", 1)
    run_sync(a, b)
    run_sync(b, c)
    put(a, "x from a", "2026-05-01", 2)
    run_sync(a, b)
    run_sync(b, c)
    put(c, "x from c, edited after a's", "2026-03-01", 3)  # c's clock is behind
    assert run_sync(b, c).plan["to_a"] == {"drawers": 1}
    r = run_sync(a, c)
    assert r.plan["to_a"] == {"drawers": 1} and r.conflicts == []
    assert run_sync(a, b).moved == 0
    assert doc(a) == doc(b) == doc(c) == "x from c, edited after a's"


def test_deleted_drawer_never_comes_back(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    run_sync(a, b)
    victim = sorted(state(a)["drawers"])[0]
    store = VectorStore(layout_for(a))
    store.delete([victim])
    store.close()
    r = run_sync(b, a)  # direction does not matter: b is now the first replica
    assert r.plan["delete_a"] == {"drawers": 1} and r.converged
    assert victim not in state(b)["drawers"]
    assert victim not in state(a)["drawers"]


def test_conflicts_last_writer_wins_prefer_and_keep_both(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    store_a, store_b = VectorStore(layout_for(a)), VectorStore(layout_for(b))
    store_a.upsert(["x", "y", "z"], ["x0", "y0", "z0"], [{"last_modified": "2026-01-01"}] * 3, unit(3, 1))
    store_a.close()
    run_sync(a, b)
    for store, side, stamp in ((store_a, "a", "2026-05-01"), (store_b, "b", "2026-06-01")):
        store.upsert(["x", "y", "z"], [f"x {side}", f"y {side}", f"z {side}"], [{"last_modified": stamp}] * 3,
                     unit(3, ord(side)))
        store.close()
    plan = cli_json("sync", a, b, "--dry-run")
    assert {c["id"]: (c["winner"], c["rule"]) for c in plan["conflicts"]} == {
        "x": ("b", "last writer wins"), "y": ("b", "last writer wins"), "z": ("b", "last writer wins")}
    assert state(a)["drawers"] != state(b)["drawers"]  # the dry run wrote nothing
    r = cli_json("sync", a, b, "--keep-both")
    assert r["converged"] and r["plan"]["keep_both"] == {"drawers": 3}
    docs = VectorStore(layout_for(a)).get(["x", "x__conflict_a"], include=("documents",))["documents"]
    assert sorted(docs) == ["x a", "x b"]
    store_a.upsert(["y"], ["y from a again"], [{"last_modified": "2025-01-01"}], unit(1, 9))
    store_a.close()
    store_b.upsert(["y"], ["y from b again"], [{"last_modified": "2027-01-01"}], unit(1, 8))
    store_b.close()
    r = cli_json("sync", a, b, "--prefer", "A")
    assert r["conflicts"][0]["rule"] == "prefer" and r["converged"]
    assert VectorStore(layout_for(b)).get(["y"], include=("documents",))["documents"] == ["y from a again"]


def test_invalidation_beats_open_triple(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    run_sync(a, b)
    tid = KnowledgeGraph(tmp_path / "a" / "knowledge_graph.sqlite3").query("SELECT id FROM triples LIMIT 1")[0][0]
    with KnowledgeGraph(tmp_path / "a" / "knowledge_graph.sqlite3") as kg:
        kg.execute_write("UPDATE triples SET valid_to='2026-11-01', extracted_at='2020-01-01' WHERE id=?", (tid,))
    with KnowledgeGraph(tmp_path / "b" / "knowledge_graph.sqlite3") as kg:
        kg.execute_write("UPDATE triples SET confidence=0.5, extracted_at='2030-01-01' WHERE id=?", (tid,))
    r = run_sync(a, b)
    assert r.conflicts == [{"table": "triples", "id": tid, "winner": "a", "rule": "invalidation beats open triple"}]
    with KnowledgeGraph(tmp_path / "b" / "knowledge_graph.sqlite3") as kg:
        assert kg.query("SELECT valid_to FROM triples WHERE id=?", (tid,)) == [("2026-11-01",)]


def test_max_delete_refuses_big_deletions(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    run_sync(a, b)
    store = VectorStore(layout_for(a))
    store.delete(sorted(state(a)["drawers"])[:50])
    store.close()
    proc = run_cli("sync", a, b, check=1)
    assert "--max-delete" in proc.stderr and len(state(b)["drawers"]) == 363
    assert cli_json("sync", a, b, "--max-delete", "50")["converged"]


def test_bundle_directory_replica(tmp_path):
    a, shared, c = str(tmp_path / "a"), tmp_path / "shared-disk", str(tmp_path / "c")
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    assert run_sync(a, f"bundle:{shared}").converged
    assert run_sync(f"bundle:{shared}", c).converged  # another machine pulls from the shared disk
    store = VectorStore(layout_for(c))
    store.upsert(["drawer_from_c"], ["written on machine c"], [{"wing": "c", "room": "r"}], unit(1, 3))
    store.delete([sorted(state(c)["drawers"])[0]])
    store.close()
    assert run_sync(c, str(shared)).converged  # detected as a bundle dir
    assert run_sync(str(shared), a).converged
    assert converged((a, None), (c, None), (f"bundle:{shared}", None))
    run_cli("verify", "--bundle", sorted(shared.glob("palace-*"))[-1])
    run_cli("verify", "--palace", a)


def test_a_bundle_replica_whose_newest_bundle_was_removed_has_rows_missing_not_deleted(tmp_path):
    """A bundle directory whose newest bundle was removed (by hand: it looked bad) went back in
    time: the rows only that bundle held are missing there, not deleted. The sync copies them back;
    it never deletes them from the palace that wrote them."""
    a, shared = str(tmp_path / "a"), tmp_path / "shared-disk"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    assert run_sync(a, f"bundle:{shared}").converged
    store = VectorStore(layout_for(a))
    store.upsert(["drawer_new_1", "drawer_new_2"], ["written after the first sync", "and this one too"],
                 [{"wing": "w", "room": "r"}] * 2, unit(2, 4))
    store.close()
    assert run_sync(a, f"bundle:{shared}").converged  # they go into a second bundle
    shutil.rmtree(list_bundles(shared)[-1])
    r = run_sync(a, f"bundle:{shared}")
    assert r.converged and r.plan["delete_a"] == {} and r.plan["to_b"] == {"drawers": 2}
    assert {"drawer_new_1", "drawer_new_2"} <= state(a)["drawers"].keys()
    assert "older than" in r.went_back["b"]
    assert run_sync(a, f"bundle:{shared}").went_back == {}  # settled: the next sync trusts what it saved


def write_drawers(palace: Path, ids: list[str], seed: int) -> None:
    """Drawers written one upsert each (one sequence number each), as MemPalace files them."""
    store = VectorStore(layout_for(palace))
    for k, i in enumerate(ids):
        store.upsert([i], [f"note {i}"], [{"wing": "w", "room": "r"}], unit(1, seed + k))
    store.close()


@pytest.mark.parametrize("written_on", [0, 4])
def test_a_palace_whose_chroma_files_were_put_back_from_an_older_copy_has_rows_missing_not_deleted(
        tmp_path, written_on):
    """Chroma's files restored from a file-level backup taken before the last sync (the palace-etl
    state directory left as it was): the rows written since are missing, not deleted. The sync
    copies them back instead of deleting them from the other replica: before any write (the
    sequence number is lower than at the last sync), and after more writes than the copy lacked
    (Chroma numbers them on from the copy's number, so the newest drawers' numbers come again)."""
    a, b, old = tmp_path / "a", str(tmp_path / "b"), tmp_path / "a-files-of-monday"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    assert run_sync(str(a), b).converged
    copy_palace_files(a, old)
    write_drawers(a, ["drawer_tue_1", "drawer_tue_2"], 5)
    assert run_sync(str(a), b).converged
    copy_palace_files(old, a)  # Monday's Chroma files put back; .palace-etl stays as it was
    write_drawers(a, [f"drawer_wed_{k}" for k in range(written_on)], 20)  # the server writes on
    r = run_sync(str(a), b)
    assert r.converged and r.plan["delete_b"] == {} and r.plan["to_a"] == {"drawers": 2}
    assert {"drawer_tue_1", "drawer_tue_2"} <= state(b)["drawers"].keys() & state(str(a))["drawers"].keys()
    assert "older copy" in r.went_back["a"]
    assert run_sync(str(a), b).went_back == {}


def test_the_newest_rows_deleted_then_written_past_are_deleted_on_the_other_replica_too(tmp_path):
    """The rows that were newest at the last sync, deleted since, with more writes after: no copy
    was put back (no sequence number came twice), so the deletes travel as deletes."""
    a, b = tmp_path / "a", str(tmp_path / "b")
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    write_drawers(a, ["drawer_tue_1", "drawer_tue_2"], 5)
    assert run_sync(str(a), b).converged
    store = VectorStore(layout_for(a))
    store.delete(["drawer_tue_1", "drawer_tue_2"])
    store.close()
    write_drawers(a, [f"drawer_wed_{k}" for k in range(4)], 20)
    r = run_sync(str(a), b)
    assert r.converged and r.went_back == {} and r.plan["delete_b"] == {"drawers": 2}
    assert not {"drawer_tue_1", "drawer_tue_2"} & state(b)["drawers"].keys()


def test_a_knowledge_graph_put_back_from_an_older_copy_has_triples_missing_not_deleted(tmp_path):
    """The knowledge graph alone restored from a copy taken before the last sync (Chroma's files and
    the palace-etl state directory left as they were): the triples added since are missing, not
    deleted. The sync copies them back instead of deleting them from the other replica."""
    a, b = tmp_path / "a", str(tmp_path / "b")
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    assert run_sync(str(a), b).converged
    kg, monday = a / "knowledge_graph.sqlite3", tmp_path / "kg-of-monday.sqlite3"
    copy_kg(kg, monday)
    with KnowledgeGraph(kg) as g:
        g.write_batch([], [(f"t_tue_{k}", "tuesday", "added", f"fact {k}", None, None, 1.0, None, None, "t")
                           for k in range(2)])
    assert run_sync(str(a), b).converged
    put_kg_back(monday, kg)  # Monday's KG put back
    r = run_sync(str(a), b)
    assert r.converged and r.plan["delete_b"] == {} and r.plan["to_a"]["triples"] == 2
    assert {"t_tue_0", "t_tue_1"} <= state(b)["triples"].keys()
    assert "older copy of knowledge_graph.sqlite3" in r.went_back["a"]
    assert run_sync(str(a), b).went_back == {}


def test_an_invalidation_a_knowledge_graph_put_back_reverted_is_kept(tmp_path):
    """A KG put back from a copy taken after its newest row was written, but before a triple was
    invalidated: no row is missing, so nothing is set aside, and the open triple it holds again
    must not undo the invalidation on the other replica. The rule "an invalidated triple beats an
    open one" keeps it, on both sides."""
    a, b = tmp_path / "a", tmp_path / "b"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    assert run_sync(str(a), str(b)).converged
    kg, monday = a / "knowledge_graph.sqlite3", tmp_path / "kg-of-monday.sqlite3"
    copy_kg(kg, monday)
    with sqlite3.connect(kg) as c:
        (tid,) = c.execute("SELECT id FROM triples WHERE valid_to IS NULL ORDER BY rowid LIMIT 1").fetchone()
        c.execute("UPDATE triples SET valid_to = '2026-12-01' WHERE id = ?", (tid,))
    assert run_sync(str(a), str(b)).converged
    put_kg_back(monday, kg)  # the triple is open again on a
    r = run_sync(str(a), str(b))
    assert r.converged and r.went_back == {} and r.plan["to_a"] == {"triples": 1} and r.plan["to_b"] == {}
    for p in (a, b):
        with sqlite3.connect(p / "knowledge_graph.sqlite3") as c:
            assert c.execute("SELECT valid_to FROM triples WHERE id = ?", (tid,)).fetchone() == ("2026-12-01",)


def test_sigkill_during_sync_then_rerun(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    store = VectorStore(layout_for(a))
    n = 6000
    for s in range(0, n, 2000):
        store.upsert([f"d{i}" for i in range(s, s + 2000)], [f"memory {i}" for i in range(s, s + 2000)],
                     [{"wing": "w", "room": "r"}] * 2000, unit(2000, s))
    store.close()
    write_sidecar(Path(a), EmbedderIdentity("random-test-vectors", 384))  # sync carries it to b
    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "sync", a, b], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120

    def copied() -> int:
        try:
            return len(state(b)["drawers"])
        except sqlite3.OperationalError:  # Chroma is still creating b's schema
            return 0

    while copied() < 1000:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(state(b)["drawers"]) < n
    r = cli_json("sync", a, b)
    assert r["converged"] and len(state(b)["drawers"]) == n
    assert cli_json("sync", a, b)["moved"] == 0
    run_cli("verify", "--palace", b)


def test_verify_parity_of_two_replicas(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cli_json("import", "mcp-memory", SAMPLE, "--palace", a)
    run_sync(a, b)
    assert "no problems found" in run_cli("verify", "--palace", a, "--palace", b).stderr
    ids = sorted(state(b)["drawers"])
    store = VectorStore(layout_for(b))
    got = store.get(ids[:2], include=("documents", "metadatas"))
    # same document and metadata, another vector: invisible to row hashes, caught by vector parity
    store.upsert(got["ids"], got["documents"], got["metadatas"], unit(2, 99))
    store.delete(ids[5:8])
    store.upsert(["drawer_only_in_b"], ["extra"], [{"wing": "w", "room": "r"}], unit(1, 4))
    store.upsert([ids[9]], ["changed only in b"], [{"wing": "w", "room": "r"}], unit(1, 5))
    store.close()
    report = json.loads(run_cli("verify", "--palace", a, "--palace", b, "--probes", "1000", "--json", check=4).stdout)
    codes = {f["code"]: f for f in report["findings"]}
    assert "3 drawers only in" in codes["replica_missing"]["message"]
    assert codes["vector_mismatch"]["message"].startswith("3 of ")  # two re-vectored + the changed one
    assert "drawer_only_in_b" in codes["replica_extra"]["message"]
    assert ids[9] in codes["replica_changed"]["message"]
    assert codes["replica_missing"]["remedy"] == f"palace-etl sync {a} {b}"


def test_deletion_against_an_edit(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    store = VectorStore(layout_for(a))
    store.upsert(["x", "y"], ["x0", "y0"], [{"last_modified": "2026-01-01T00:00:00"}] * 2, unit(2, 1))
    store.close()
    run_sync(a, b)
    store_a, store_b = VectorStore(layout_for(a)), VectorStore(layout_for(b))
    store_a.delete(["x", "y"])
    store_a.close()
    # b edits both: x with a stamp before the deletion happens (now), y after it (a re-creation)
    store_b.upsert(["x", "y"], ["x edited", "y re-created"],
                   [{"last_modified": "2026-02-01T00:00:00"}, {"last_modified": "2999-01-01T00:00:00"}], unit(2, 2))
    store_b.close()
    plan = run_sync(a, b, dry_run=True)
    assert {c["id"]: c["rule"] for c in plan.conflicts} == {"x": "deletion wins", "y": "written after the deletion"}
    assert run_sync(a, b, prefer="b").converged  # --prefer the editing side keeps both
    assert sorted(state(a)["drawers"]) == ["x", "y"]


def test_a_row_with_a_float_chroma_cannot_store_stably_converges(tmp_path):
    """Below 1e-6, each Chroma write can move a float's last digits; the row hash must not see that
    as an edit, or such a row is copied on every sync and never converges."""
    from palace.rows import row_hash

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    store = VectorStore(layout_for(a))
    store.upsert(["x", "y"], ["tiny", "plain"], [{"wing": "w", "room": "r", "f": -7.652901957568894e-22},
                                                 {"wing": "w", "room": "r", "f": 1764623456.589079}], unit(2, 1))
    store.close()
    write_sidecar(a, EmbedderIdentity("random-test-vectors", 384))
    first = run_sync(a, b)
    assert first.converged, first.differences
    again = run_sync(a, b)
    assert again.moved == 0 and again.converged
    assert row_hash("d", {"f": 1764623456.589079}) != row_hash("d", {"f": 1764623456.58908})  # others exact


def test_a_later_sync_reads_only_what_changed_and_misses_no_outside_edit(tmp_path, postgres, monkeypatch):
    """Each replica remembers its change marks with its sync state (Chroma's ``seq_id``, PostgreSQL's
    ``xmin``), so a later sync reads only the rows whose marks moved. Edits made outside palace-etl --
    a metadata-only update through a plain Chroma client, an SQL UPDATE and DELETE as MemPalace's
    pgvector backend makes them -- still move marks, and reach the other replica."""
    import psycopg

    from palace.stores import ChromaDirStore, PgVectorStore

    monkeypatch.setenv("MEMPALACE_PGVECTOR_DSN", postgres)
    a, b = str(tmp_path / "a"), f"pgvector:{tmp_path / 'b'}"
    ids = [f"drawer_{i:03d}" for i in range(50)]
    store = VectorStore(layout_for(a))
    store.upsert(ids, [f"memory {i}" for i in ids], [{"wing": "w", "room": "r"}] * 50, unit(50, 3))
    store.close()
    assert run_sync(a, b).converged
    read: list[str] = []
    spy = pytest.MonkeyPatch()
    for cls in (ChromaDirStore, PgVectorStore):  # a spy around the real method: which rows were read
        real = cls._hashes
        spy.setattr(cls, "_hashes", lambda self, t, got, real=real: (read.extend(got), real(self, t, got))[1])
    quiet = run_sync(a, b)
    assert quiet.moved == 0 and quiet.rehashed == {} and read == []

    store = VectorStore(layout_for(a))
    with store.writing() as col:
        col.update(ids=[ids[0]], metadatas=[{"room": "moved in a"}])  # metadata only: no text, no vector
    store.close()
    pg = open_store(b)
    table = pg._q("drawers")
    pg.close()
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET metadata = metadata || '{{\"room\": \"moved in b\"}}', "
                     "updated_at = now() WHERE id = %s", (ids[1],))
        conn.execute(f"DELETE FROM {table} WHERE id = %s", (ids[2],))
    r = run_sync(a, b)
    assert r.rehashed == {} and r.converged
    assert r.plan["to_b"] == {"drawers": 1} and r.plan["to_a"] == {"drawers": 1} and r.plan["delete_a"] == {"drawers": 1}
    assert sorted(read) == sorted([ids[0], ids[1], ids[1], ids[0]])  # each edit, then each row written
    spy.undo()
    sa, sb = state(a), state(b)
    assert sa == sb and ids[2] not in sa["drawers"] and len(sa["drawers"]) == 49
    replica = open_store(a)
    try:
        rows = {r["id"]: r for page in replica.fetch("drawers", ids[:2], vectors=False) for r in page}
    finally:
        replica.close()
    assert rows[ids[0]]["metadata"]["room"] == "moved in a" and rows[ids[1]]["metadata"]["room"] == "moved in b"


def test_marks_of_a_collection_made_anew_are_not_trusted(tmp_path):
    """A collection recreated in place (as MemPalace's ``repair rebuild-index`` does, keeping the rest
    of the palace directory, the sync state among it) numbers its writes from the start again: a row
    rewritten there with other text carries the very mark its old version had. The sync sees a new
    collection, reads every row of that side, says why, and the edit reaches the other replica."""
    import chromadb
    from chromadb.api.client import SharedSystemClient

    from palace.layout import HNSW_METADATA

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ids = [f"drawer_{i:03d}" for i in range(20)]
    docs, metas, vecs = [f"memory {i}" for i in ids], [{"wing": "w", "room": "r"}] * 20, unit(20, 5)
    store = VectorStore(layout_for(a))
    store.upsert(ids, docs, metas, vecs)
    store.close()
    assert run_sync(a, b).converged

    def marks() -> dict:
        replica = open_store(a)
        try:
            return replica.marks()["rows"]["drawers"]
        finally:
            replica.close()

    before = marks()
    SharedSystemClient.clear_system_cache()
    client = chromadb.PersistentClient(a)
    client.delete_collection("mempalace_drawers")
    col = client.create_collection("mempalace_drawers", metadata=dict(HNSW_METADATA), embedding_function=None)
    docs[3] = "memory 3, rewritten while the index was rebuilt"
    col.add(ids=ids, documents=docs, metadatas=metas, embeddings=vecs)
    del col, client
    SharedSystemClient.clear_system_cache()
    assert marks() == before  # the same marks, one of them over other text

    r = run_sync(a, b)
    replica = open_store(b)
    try:
        assert [row["document"] for page in replica.fetch("drawers", [ids[3]], vectors=False) for row in page] == [docs[3]]
    finally:
        replica.close()
    assert r.converged and r.plan["to_b"] == {"drawers": 1}
    assert "recreated" in r.rehashed["a"] and "b" not in r.rehashed


def _chroma_files(palace: Path) -> dict[str, tuple[str, int]]:
    """``fingerprint`` of Chroma's own files in ``palace`` (palace-etl's sync state left out)."""
    from .test_live import fingerprint

    return {k: v for k, v in fingerprint(palace).items() if not k.startswith(".palace-etl")}


def test_a_replica_that_only_gives_rows_is_read_from_a_private_copy(tmp_path, monkeypatch):
    """A sync into an empty replica reads the rows it carries from a private copy of the giving
    replica (``read_view``), not through a Chroma client on it: opening one is a write (a backfill, a
    log purge). Chroma's files there are left byte for byte (and mtime), the vectors arrive (to the last bit or two:
    Chroma normalises each vector it is given and multiplies the norm back on reading), and no copy is
    left in the temp directory."""
    import tempfile

    from palace.stores import ChromaDirReader

    from .helpers import palace_rows

    a, b, temp = tmp_path / "a", tmp_path / "b", tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # this test's own temp directory
    ids = [f"drawer_{i:03d}" for i in range(300)]
    store = VectorStore(layout_for(a))
    store.upsert(ids, [f"memory {i}" for i in ids], [{"wing": "w", "room": f"r{i % 3}"} for i in range(300)], unit(300, 6))
    store.close()
    before = _chroma_files(a)
    copies = []
    real = ChromaDirReader._copy
    monkeypatch.setattr(ChromaDirReader, "_copy", lambda self: (copies.append(self.path), real(self))[1])
    r = run_sync(str(a), str(b))
    assert r.converged and r.moved == 300 and a in copies
    assert _chroma_files(a) == before and not list(temp.iterdir())
    got, want = palace_rows(b, vectors=True), palace_rows(a, vectors=True)
    assert got.keys() == want.keys() and all(np.allclose(got[i]["embedding"], want[i]["embedding"], rtol=0, atol=1e-7)
                                             and got[i]["document"] == want[i]["document"] for i in want)

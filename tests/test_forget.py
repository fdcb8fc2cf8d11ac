"""``palace-etl forget``: nothing of a forgotten memory is left in any file of the palace, its
bundles (plain and encrypted, every bundle of every chain) or a synced replica; sync never brings
it back, a re-import skips it, and a forget killed at any point finishes on the re-run."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pyrage
import pytest

from palace.kg import KnowledgeGraph, entity_id
from palace.layout import layout_for
from palace.vectors import VectorStore

from .helpers import SAMPLE, cli_json, palace_rows, run_cli
from .test_diff import triple
from .test_do_no_harm import tree
from .test_encrypted import keypair

SECRET = "my bank PIN is 4921 and the spare key is under the blue flowerpot"
SECRET_ID = "drawer_private_bank_0001"
WORD = b"flowerpot"  # a fragment: not even a piece of the text may survive


def note(palace: Path, texts: dict[str, str], embedder) -> None:
    """Drawers filed as MemPalace's own tools would, with real MiniLM vectors (verify probes re-embed)."""
    ids = sorted(texts)
    store = VectorStore(layout_for(palace))
    store.upsert(ids, [texts[i] for i in ids], [{"wing": "private", "room": "secrets"} for _ in ids],
                 embedder.embed([texts[i] for i in ids]))
    store.close()


def secret_palace(path: Path, embedder) -> Path:
    cli_json("import", "mcp-memory", SAMPLE, "--palace", path)
    note(path, {SECRET_ID: SECRET, "drawer_private_bank_0002": "the bank opens at nine"}, embedder)
    with KnowledgeGraph(path / "knowledge_graph.sqlite3") as kg:  # ids by MemPalace's recipe, as an import makes them
        kg.replace_rows("entities", [{"id": entity_id(n), "name": n, "type": "thing", "properties": "{}",
                                      "created_at": "2026-01-01"} for n in ("spare key", "blue flowerpot")])
        kg.replace_rows("triples", [dict(triple("t_key", entity_id("spare key"), "is_under",
                                                entity_id("blue flowerpot")), source_drawer_id=SECRET_ID)])
    return path


@pytest.fixture(scope="module")
def original(tmp_path_factory, embedder) -> Path:
    return secret_palace(tmp_path_factory.mktemp("forget") / "palace", embedder)


def decoded(path: Path, key: Path | None) -> bytes:
    """Every value of a Parquet file (decrypted with ``key`` when it is age), as bytes to search."""
    data = path.read_bytes()
    if path.suffix == ".age":
        ident = pyrage.x25519.Identity.from_str(key.read_text().splitlines()[-1])
        data = pyrage.decrypt(data, [ident])
        if not path.name.endswith(".parquet.age"):
            return data
        tmp = path.with_name(".check.parquet")
        tmp.write_bytes(data)
        try:
            return repr(pq.read_table(tmp).to_pylist()).encode()
        finally:
            tmp.unlink()
    if path.suffix == ".parquet":
        return repr(pq.read_table(path).to_pylist()).encode()
    return data


def holding(root: Path, needle: bytes, key: Path | None = None) -> list[str]:
    """Files under ``root`` whose raw bytes (SQLite free pages, logs, WAL included) or decoded
    contents (zstd Parquet, age) hold ``needle``."""
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            if needle in p.read_bytes() or (p.suffix in (".parquet", ".age") and needle in decoded(p, key)):
                hits.append(str(p))
    return hits


def setup(tmp_path: Path, original: Path, embedder) -> dict:
    key, pub = keypair(tmp_path, "me")
    palace = tmp_path / "palace"
    shutil.copytree(original, palace)
    plain, sealed = tmp_path / "plain", tmp_path / "sealed"
    for n in range(3):  # chains: a full bundle and incrementals, each bundle's state names the secret
        note(palace, {f"drawer_private_bank_1{n:03d}": f"routine note number {n} about the week"}, embedder)
        cli_json("export", "--palace", palace, "--out", plain, "--incremental")
        cli_json("export", "--palace", palace, "--out", sealed, "--encrypt-to", pub, "--incremental")
    replica = tmp_path / "replica"
    assert cli_json("sync", palace, replica)["converged"]
    where = {"palace": palace, "plain": plain, "sealed": sealed, "replica": replica, "key": key, "pub": pub}
    for name in ("palace", "plain", "sealed", "replica"):
        assert holding(where[name], WORD, key), name  # the search can find it before the forget
    return where


def test_forget_leaves_nothing_anywhere_and_nothing_comes_back(original, tmp_path, embedder):
    w = setup(tmp_path, original, embedder)
    before = tree(w["palace"])
    dry = cli_json("forget", "--palace", w["palace"], "--match", "FLOWERPOT", "--with-kg", "--identity", w["key"],
                   "--dry-run")
    assert dry["counts"] == {"drawers": 1, "triples": 1, "entities": 2}
    assert set(dry["bundle_dirs"]) == {str(w["plain"].resolve()), str(w["sealed"].resolve())}  # found by itself
    assert tree(w["palace"]) == before

    r = cli_json("forget", "--palace", w["palace"], "--match", "FLOWERPOT", "--with-kg", "--identity", w["key"])
    assert r["removed"]["drawers"] == [SECRET_ID] and r["removed"]["triples"] == ["t_key"]
    assert sum("rewritten" in line for line in r["receipt"]) == 6  # every bundle of both chains
    for name in ("palace", "plain", "sealed"):
        assert holding(w[name], WORD, w["key"]) == [], name
    assert holding(w["replica"], WORD)  # not synced yet
    for d in ("plain", "sealed"):
        bundles = sorted(w[d].glob("palace-*"))
        for b in bundles:
            v = cli_json("verify", "--bundle", b, "--identity", w["key"])
            assert v["ok"], v["findings"]
        run_cli("restore", bundles[-1], "--palace", tmp_path / f"restored-{d}", "--identity", w["key"])
        assert palace_rows(tmp_path / f"restored-{d}") == palace_rows(w["palace"])

    # the palace still opens, counts and searches, in palace-etl and in MemPalace itself
    assert cli_json("verify", "--palace", w["palace"])["ok"]
    status = subprocess.run([sys.executable, "-m", "mempalace", "--palace", str(w["palace"]), "status"],
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and f"{len(palace_rows(w['palace']))} drawers" in status.stdout

    # sync erases it on the replica (files scrubbed too), and from a third replica that never met the palace
    third = tmp_path / "third"
    shutil.copytree(w["replica"], third)
    shutil.rmtree(third / ".palace-etl")
    s = cli_json("sync", w["palace"], w["replica"])
    assert s["converged"] and s["forgotten"]["b"] == {"drawers": 1, "triples": 1, "entities": 2}
    assert holding(w["replica"], WORD) == []
    assert cli_json("sync", w["replica"], third)["converged"]
    assert holding(third, WORD) == [] and SECRET_ID not in palace_rows(third)

    # importing again what once brought it in (here: the palace as it was) skips it
    imp = cli_json("import", "palace", original, "--palace", w["palace"], check=None)
    assert imp["skipped"].get("forgotten drawers (palace-etl forget)") == 1, imp["skipped"]
    assert SECRET_ID not in palace_rows(w["palace"]) and holding(w["palace"], WORD) == []


def test_forget_refuses_before_any_change(original, tmp_path, embedder):
    w = setup(tmp_path, original, embedder)
    before = {n: tree(w[n]) for n in ("palace", "plain", "sealed")}
    proc = run_cli("forget", "--palace", w["palace"], "--id", SECRET_ID, check=1)  # encrypted bundles, no key
    assert "it is encrypted" in proc.stderr
    other, _ = keypair(tmp_path, "other")
    proc = run_cli("forget", "--palace", w["palace"], "--id", SECRET_ID, "--identity", other, check=1)
    assert "does not decrypt with" in proc.stderr
    run_cli("forget", "--palace", w["palace"], check=1)  # nothing chosen
    run_cli("forget", "--palace", w["palace"], "--where", "no-equals-sign", check=1)
    assert {n: tree(w[n]) for n in before} == before


@pytest.mark.parametrize("when", ["recorded", "rewriting"])
def test_forget_killed_anywhere_finishes_on_the_rerun(original, tmp_path, embedder, when):
    """SIGKILL as soon as the forget has recorded what it erases, or while a bundle is being
    rewritten, then re-run: the ids it recorded are finished, every chain verifies, and nothing of
    the text is left."""
    for attempt in range(5):
        (tmp_path / f"try{attempt}").mkdir()
        w = setup(tmp_path / f"try{attempt}", original, embedder)
        proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "forget", "--palace", str(w["palace"]), "--match",
                                 "flowerpot", "--with-kg", "--identity", str(w["key"])], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=os.environ.copy())
        pending = w["palace"] / ".palace-etl" / "forget-pending.json"
        mid_rewrite = when == "rewriting"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if pending.exists() and (not mid_rewrite or any(p.name.startswith((".tmp-palace-", ".old-palace-"))
                                                            for d in ("plain", "sealed") for p in w[d].iterdir())):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        if proc.returncode != -signal.SIGKILL:
            continue  # it finished before the kill: try again
        left = pending.exists()  # (the kill may land after the forget's last step, a moment before it exits)
        r = cli_json("forget", "--palace", w["palace"], "--match", "flowerpot", "--with-kg", "--identity", w["key"])
        assert (r["resumed"] >= 1) == left and not pending.exists()
        for name in ("palace", "plain", "sealed"):
            assert holding(w[name], WORD, w["key"]) == [], name
        for d in ("plain", "sealed"):
            names = sorted(p.name for p in w[d].iterdir() if p.name.startswith("palace-"))
            assert len(names) == 3 and not [p for p in w[d].iterdir() if p.name.startswith((".tmp-", ".old-"))]
            assert cli_json("verify", "--bundle", w[d] / names[-1], "--identity", w["key"])["ok"]
        return
    pytest.fail("the forget finished every time before it could be killed")


def test_heap_garbage_chroma_persists_in_unused_hnsw_slots_is_cleared(original, tmp_path):
    """chroma-hnswlib persists an index's unused capacity uncleared: whatever the writing process's
    heap held lands in data_level0.bin (seen in this suite: the forgotten drawer's words in an index
    that had persisted 0 elements). Planted here where Chroma leaves it, a forget clears it and the
    palace still verifies."""
    import struct

    palace = tmp_path / "palace"
    shutil.copytree(original, palace)
    (seg,) = [d for d in palace.iterdir() if (d / "header.bin").is_file() and (d / "data_level0.bin").stat().st_size]
    _, _, capacity, count, size, _, _ = struct.unpack("<iQQQQQQ", (seg / "header.bin").read_bytes()[:52])
    data = seg / "data_level0.bin"
    assert data.stat().st_size == capacity * size and count < capacity  # a small palace: nothing persisted yet
    with open(data, "r+b") as f:
        f.seek((capacity - 1) * size + 40)
        f.write(SECRET.encode())
    from palace.stores import ChromaDirStore

    store = ChromaDirStore(layout_for(palace))  # the scrub a forget runs after its deletes (Chroma writes
    notes = store.scrub({"drawers": set()})      # the file itself during them, so plant after, scrub here)
    store.close()
    assert any("unused HNSW slots cleared" in n for n in notes) and WORD not in data.read_bytes()
    cli_json("forget", "--palace", palace, "--id", SECRET_ID, "--with-kg")
    assert holding(palace, WORD) == []
    assert cli_json("verify", "--palace", palace)["ok"]


def test_kg_path_means_the_knowledge_graph_file_as_on_every_verb(original, tmp_path):
    """``--kg PATH`` points at a KG kept elsewhere (as on import, status, export); ``--with-kg``
    asks for the triples. The triple naming the secret goes from that file, and its words with it."""
    palace, kg = tmp_path / "palace", tmp_path / "elsewhere" / "kg.sqlite3"
    shutil.copytree(original, palace)
    kg.parent.mkdir()
    shutil.move(palace / "knowledge_graph.sqlite3", kg)
    dry = cli_json("forget", "--palace", palace, "--kg", kg, "--id", SECRET_ID, "--with-kg", "--dry-run")
    assert dry["dry_run"] and not (palace / "knowledge_graph.sqlite3").exists()
    assert WORD in kg.read_bytes()
    cli_json("forget", "--palace", palace, "--kg", kg, "--id", SECRET_ID, "--with-kg")
    assert WORD not in kg.read_bytes() and not (palace / "knowledge_graph.sqlite3").exists()
    with KnowledgeGraph(kg) as g:
        assert g.query("SELECT count(*) FROM triples WHERE id = ?", ["t_key"]) == [(0,)]


def test_a_replica_that_learns_of_a_forget_drops_the_ids_from_its_own_run_ledger(tmp_path):
    """Both machines imported the same source, so each run ledger keeps the id of a drawer as a resume
    sample. A forget on one machine reaches the other by sync, which overwrites the id there too."""
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        cli_json("import", "mcp-memory", SAMPLE, "--palace", p)
    assert cli_json("sync", a, b)["converged"]
    with sqlite3.connect(b / ".palace-etl" / "ledger.sqlite3") as c:
        (sample,) = c.execute("SELECT sample FROM batches WHERE kind = 'drawers' ORDER BY seq LIMIT 1").fetchone()
    erased = orjson.loads(sample)[0]
    cli_json("forget", "--palace", a, "--id", erased)
    s = cli_json("sync", a, b)
    assert s["converged"] and any("ledger.sqlite3: the ids dropped" in line for line in s["scrubbed"])
    assert not [f for f in (b / ".palace-etl").glob("ledger.sqlite3*") if erased.encode() in f.read_bytes()]


def test_forget_reaches_the_palace_a_restore_kept_aside(original, tmp_path):
    """``restore --force`` keeps the palace it replaces beside it (``<palace>.before-restore-<stamp>``):
    a copy palace-etl made, holding what the palace held. Here the palace is put back from a bundle
    written before the secret came in, so only the copy kept aside holds it; forget erases it there."""
    palace, bundles = tmp_path / "palace", tmp_path / "bundles"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    before_secret = cli_json("export", "--palace", palace, "--out", bundles)["bundle"]
    shutil.rmtree(palace)
    shutil.copytree(original, palace)
    r = cli_json("restore", before_secret, "--palace", palace, "--force")
    aside = Path(r["replaced"])
    assert aside.name.startswith("palace.before-restore-") and holding(aside, WORD) and not holding(palace, WORD)

    dry = cli_json("forget", "--palace", palace, "--match", "flowerpot", "--with-kg", "--dry-run")
    assert dry["counts"] == {} and dry["kept_aside"] == [
        {"palace": str(aside), "counts": {"drawers": 1, "triples": 1, "entities": 2}}]
    assert holding(aside, WORD)
    text = run_cli("forget", "--palace", palace, "--match", "flowerpot", "--with-kg").stdout
    assert f"kept aside by a restore: {aside}: erased 1 drawers, 2 entities, 1 triples" in text
    assert holding(aside, WORD) == [] and holding(palace, WORD) == []
    assert cli_json("verify", "--palace", aside)["ok"]

    (aside / "chroma.sqlite3").write_bytes(b"not a database")  # a copy kept aside that cannot be read
    r = run_cli("forget", "--palace", palace, "--match", "bank")
    assert "kept aside by a restore) was not reached" in r.stderr and str(aside) in r.stderr
    direct = run_cli("forget", "--palace", aside, "--match", "bank", check=1)  # named, not a traceback
    assert "a database of the palace is damaged" in direct.stderr and "Traceback" not in direct.stderr


def test_a_bundle_that_cannot_be_rewritten_does_not_keep_the_others_holding_a_forgotten_memory(original, tmp_path):
    """One bundle of a directory does not verify (a flipped bit on the backup disk). The forget
    stopped at it: every newer bundle kept the memory, and each re-run stopped there again. Now
    every other bundle is rewritten, the one that could not be is named (exit 3, partial), and the
    forget stays pending: once that bundle is repaired, a re-run finishes it."""
    from .helpers import flip_a_byte

    palace, out = tmp_path / "palace", tmp_path / "backups"
    shutil.copytree(original, palace)
    old = Path(cli_json("export", "--palace", palace, "--out", out)["bundle"])
    new = Path(cli_json("export", "--palace", palace, "--out", out)["bundle"])
    flip_a_byte(old / "drawers.parquet")
    r = cli_json("forget", "--palace", palace, "--id", SECRET_ID, "--with-kg", check=3)
    assert holding(new, WORD) == [] and holding(palace, WORD) == [str(palace / ".palace-etl" / "forget-pending.json")]
    assert [u["bundle"] for u in r["unscrubbed"]] == [str(old)] and "does not verify" in r["unscrubbed"][0]["why"]
    said = run_cli("forget", "--palace", palace, check=3).stderr  # pending: re-run, the same bundle is named
    assert f"{old}" in said and "may still hold" in said
    flip_a_byte(old / "drawers.parquet")  # repaired (put back from a copy)
    r = cli_json("forget", "--palace", palace)
    assert r["unscrubbed"] == [] and holding(old, WORD) == [] and holding(out, WORD) == []
    assert cli_json("verify", "--bundle", old)["ok"]
    run_cli("forget", "--palace", palace, check=1)  # nothing pending now: nothing chosen


def test_a_sync_that_carries_a_forget_to_a_shared_directory_is_not_stuck_on_a_bundle_it_cannot_open(original,
                                                                                                   tmp_path):
    """A shared directory, the sync replica of this palace, also holds another palace's backup,
    encrypted to a key this machine does not have. A sync that carried a forget into the replica
    scrubbed every bundle of the directory and stopped at that one, after writing: every later
    sync failed the same way ("pass --identity"), and the replica's older bundles kept the memory.
    Now the bundles it can open are scrubbed, the sync converges and saves, and the one it could not
    open is named."""
    palace, other, shared = tmp_path / "palace", tmp_path / "other", tmp_path / "shared"
    shutil.copytree(original, palace)
    assert cli_json("sync", palace, f"bundle:{shared}")["converged"]
    cli_json("import", "mcp-memory", SAMPLE, "--palace", other)
    key, pub = keypair(tmp_path, "theirs")
    theirs = Path(cli_json("export", "--palace", other, "--out", shared, "--encrypt-to", pub)["bundle"])
    cli_json("forget", "--palace", palace, "--id", SECRET_ID, "--with-kg")
    s = cli_json("sync", palace, f"bundle:{shared}")
    assert s["converged"] and s["forgotten"]["b"] == {"drawers": 1, "triples": 1, "entities": 2}
    assert any(str(theirs) in line and "may still hold" in line for line in s["scrubbed"]), s["scrubbed"]
    assert holding(shared, WORD, key) == []  # (their bundle read with their key: it never held it)
    again = cli_json("sync", palace, f"bundle:{shared}")
    assert again["converged"] and again["moved"] == 0 and again["scrubbed"] == []

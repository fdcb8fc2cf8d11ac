"""Reads beside a live MemPalace 3.11: a real ``mempalace serve`` hub on 127.0.0.1 holds the palace's
writer lease for its whole life, and export, verify and status still work -- from a private copy,
without the lock -- and leave every byte and mtime of the live palace as it was."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from palace.lock import lock_path

from .helpers import SAMPLE, LiveHub, StdioMcp, cli_json, lease_held, run_cli


def fingerprint(palace: Path) -> dict[str, tuple[str, int]]:
    """Every file of the palace: its sha256 and mtime."""
    return {str(p.relative_to(palace)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(palace.rglob("*")) if p.is_file()}


def add_drawer_call(n: int, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": "mempalace_add_drawer",
                       "arguments": {"wing": "live", "room": "server", "content": text}}}


def drawer_id_of(answer: dict) -> str:
    """The drawer id a MemPalace add_drawer answer names."""
    text = answer["result"]["content"][0]["text"]
    assert '"success": true' in text.replace("'", '"').lower() or "drawer_" in text, text
    return json.loads(text)["drawer_id"]


@pytest.fixture
def served_palace(tmp_path):
    """A palace served by a real ``mempalace serve`` hub that has written one drawer through its own
    ``tools/call``: (palace, the hub's URL, that drawer's id)."""
    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    hub = LiveHub(palace)
    try:
        hub.start()
        answer = httpx.post(hub.url, json=add_drawer_call(1, "the hub filed this memory before the backup"),
                            timeout=120).json()
        yield palace, hub.url, drawer_id_of(answer)
    finally:
        hub.stop()


def test_export_verify_status_beside_a_live_hub_leave_the_palace_untouched(served_palace, tmp_path):
    palace, url, theirs = served_palace
    time.sleep(1.0)  # whatever the hub writes after its write, it has written
    before = fingerprint(palace)
    locks = sorted(os.listdir(lock_path(palace).parent))
    r = cli_json("export", "--palace", palace, "--out", tmp_path / "b", "--lock-timeout", "1")
    assert r["totals"]["drawers"] == 364 and r["totals"]["triples"] == 223
    incr = cli_json("export", "--palace", palace, "--out", tmp_path / "b", "--incremental", "--lock-timeout", "1")
    assert incr["kind"] == "incremental" and sum(incr["counts"].values()) == 0
    run_cli("verify", "--palace", palace, "--against", "mcp-memory", SAMPLE, "--lock-timeout", "1")
    status = cli_json("status", "--palace", palace, "--probes", "400", "--lock-timeout", "1")
    assert status["drawers"] == 364 and status["self_hit_rate"] == 1.0
    assert lease_held(palace)  # the hub held its lease the whole time
    after = fingerprint(palace)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, changed  # nothing locked, written, renamed or re-stamped
    assert sorted(os.listdir(lock_path(palace).parent)) == locks  # no lock files left for private copies
    later = httpx.post(url, json=add_drawer_call(2, "the hub still writes after the backup"), timeout=120).json()
    assert drawer_id_of(later) != theirs  # and it keeps answering and writing
    restored = tmp_path / "restored"
    cli_json("restore", r["bundle"], "--palace", restored)
    run_cli("verify", "--palace", restored, "--against", "mcp-memory", SAMPLE)
    assert_finds_itself(restored, theirs)


def assert_finds_itself(palace: Path, drawer: str) -> None:
    """The drawer is in the palace, and its own vector finds it first."""
    from palace.stores import open_store

    store = open_store(palace, read_only=True)
    try:
        (row,) = [r for page in store.fetch("drawers", [drawer]) for r in page]
        (ids, _), = store.nearest("drawers", np.asarray([row["embedding"]], dtype=np.float32), 1)
        assert ids == [drawer]
    finally:
        store.close()


def test_export_verify_status_beside_a_stdio_mcp_server_that_wrote(tmp_path):
    """A stdio ``mempalace-mcp`` that answered one ``mempalace_add_drawer`` holds the lease until it
    exits (and registers nowhere); the backup still works beside it and carries its drawer."""
    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    server = StdioMcp(palace)
    try:
        theirs = server.add_drawer("the stdio server filed this memory")["drawer_id"]
        assert lease_held(palace)
        before = fingerprint(palace)
        r = cli_json("export", "--palace", palace, "--out", tmp_path / "b", "--lock-timeout", "1")
        run_cli("verify", "--palace", palace, "--lock-timeout", "1")
        assert cli_json("status", "--palace", palace, "--lock-timeout", "1")["drawers"] == 364
        after = fingerprint(palace)
        assert not sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert server.add_drawer("the stdio server still writes")["drawer_id"] != theirs
    finally:
        server.close()
    cli_json("restore", r["bundle"], "--palace", tmp_path / "restored")
    assert_finds_itself(tmp_path / "restored", theirs)


def test_a_copy_torn_by_a_writer_is_retaken(tmp_path, monkeypatch):
    """A segment file that changes while the copy is taken makes the copy be taken again."""
    from palace import chroma_sqlite
    from palace.stores import chroma_dir

    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    real, calls = chroma_dir._segment_stamps, []

    def moving(path):
        calls.append(path)
        stamps = real(path)
        return {**stamps, "torn": (len(calls), 0)} if len(calls) <= 2 else stamps  # the first try is torn

    monkeypatch.setattr(chroma_dir, "_segment_stamps", moving)
    monkeypatch.setattr(chroma_sqlite, "RACY_NS", 0)  # the import's files just written are not what this test is about
    copy = chroma_dir.take_copy(palace)
    try:
        assert len(calls) == 4  # before/after of a torn try, then of a clean one
        assert (copy / "chroma.sqlite3").exists()
    finally:
        import shutil

        shutil.rmtree(copy)


def test_a_segment_file_written_just_now_is_copied_only_once_a_later_write_would_show(tmp_path, monkeypatch):
    """Before Linux 6.13 a file's mtime moves with a coarse clock tick, so a write in the same tick
    as the one before it leaves the file's stamp as it was, and a copy torn by it would pass the
    stamp check. A file written within that window is copied only once it is old enough for any
    later write to show. Here the window is widened to 2 s and the same-tick write is played by a
    write that puts the file's stamp back as it was: the copy must hold what that write wrote."""
    import threading

    from palace import chroma_sqlite
    from palace.stores import chroma_dir
    from palace.vectors import segment_dirs

    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    (seg,) = segment_dirs(palace)
    data = seg / "data_level0.bin"
    monkeypatch.setattr(chroma_sqlite, "RACY_NS", 2_000_000_000)
    stamp = time.time_ns()
    os.utime(data, ns=(stamp, stamp))  # written just now
    copies = []
    taking = threading.Thread(target=lambda: copies.append(chroma_dir.take_copy(palace)))
    taking.start()
    time.sleep(0.3)
    with open(data, "r+b") as f:  # the same tick's next write: new bytes, the same stamp
        f.seek(64)
        f.write(b"\x7f" * 64)
    os.utime(data, ns=(stamp, stamp))
    taking.join()
    try:
        assert (copies[0] / seg.name / data.name).read_bytes() == data.read_bytes()
    finally:
        shutil.rmtree(copies[0])


def test_a_database_written_just_now_is_copied_through_sqlite_not_as_a_file(tmp_path, monkeypatch):
    """``private_copy`` copies an idle database (the knowledge graph, the ledger) as a file when its
    stamp is the same before and after; one written within the clock's tick before the stamp could
    be written again unseen, so it is read through SQLite's own locking instead."""
    import sqlite3

    from palace import chroma_sqlite

    db = tmp_path / "kg.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    through_sqlite = []
    real = chroma_sqlite.copy_db
    monkeypatch.setattr(chroma_sqlite, "copy_db", lambda *a: through_sqlite.append(a) or real(*a))
    old = time.time_ns() - 10**10
    os.utime(db, ns=(old, old))
    chroma_sqlite.private_copy(db, tmp_path / "settled.sqlite3")
    assert through_sqlite == [] and (tmp_path / "settled.sqlite3").read_bytes() == db.read_bytes()
    now = time.time_ns()
    os.utime(db, ns=(now, now))
    chroma_sqlite.private_copy(db, tmp_path / "fresh.sqlite3")
    assert len(through_sqlite) == 1
    second = time.time_ns() // 10**9 * 10**9  # a whole-second stamp (ext3, FAT, HFS+) from this very second
    time.sleep(max(0.0, (second + 10**8 - time.time_ns()) / 1e9))  # past the 20 ms a fine stamp would get
    os.utime(db, ns=(second, second))
    chroma_sqlite.private_copy(db, tmp_path / "coarse.sqlite3")
    assert len(through_sqlite) == 2
    with sqlite3.connect(tmp_path / "fresh.sqlite3") as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    conn.close()


def test_a_reader_dropped_unclosed_removes_its_private_copies_only_after_the_last_read(tmp_path, monkeypatch):
    """A lock-free reader's private copies (the Chroma files, the KG) are removed by ``close`` and,
    should a caller drop it unclosed, when it is collected: never while a read of it is still going on."""
    import gc
    import tempfile

    from palace.layout import layout_for
    from palace.stores.chroma_dir import ChromaDirReader

    palace, scratch = tmp_path / "palace", tmp_path / "scratch"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    pages = ChromaDirReader(layout_for(palace)).rows("drawers", ())  # nothing holds the reader itself
    gc.collect()
    assert len(list(scratch.iterdir())) == 2  # its Chroma copy and the copy of its KG
    assert sum(len(page) for page in pages) == 363
    del pages
    gc.collect()
    assert list(scratch.iterdir()) == []
    reader = ChromaDirReader(layout_for(palace))
    reader.snapshot()
    reader.close()
    assert list(scratch.iterdir()) == []


# A writer in another process: fixed-size transactions, each of 200 rows, as fast as it can, with a
# cache so small that SQLite tries to spill each one into the database file before its commit.
SQLITE_WRITER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("PRAGMA cache_size=-64")
if sys.argv[3] == "wal":
    conn.execute("PRAGMA wal_autocheckpoint=0")  # every commit stays in the -wal while this runs
end, n = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end or n < 5:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(bytes([n % 256]) * 700,)] * 200)
    conn.execute("COMMIT")
    n += 1
print(n, flush=True)
if sys.argv[3] == "wal":
    sys.stdin.readline()  # keeps the -wal, uncheckpointed, until the test has copied it
"""


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_a_database_copied_beside_a_live_writer_is_a_committed_state(tmp_path, mode):
    """``copy_db`` (the private copy every lock-free reader takes of ``chroma.sqlite3``) never copies a
    transaction half-way, whatever the writer does meanwhile: each copy passes SQLite's integrity check
    and holds whole transactions only; a WAL database's commits still in its ``-wal`` are in the copy."""
    import sqlite3
    import subprocess
    import sys

    from palace.chroma_sqlite import copy_db

    db = tmp_path / "chroma.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(b"seed" * 100,)] * 2000)
    conn.commit()
    conn.close()
    writer = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(db), "3" if mode == "delete" else "0", mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    copies = 0
    try:
        if mode == "wal":
            assert int(writer.stdout.readline()) >= 5 and Path(f"{db}-wal").stat().st_size > 0
        while copies < 3 or (mode == "delete" and writer.poll() is None):
            dest = tmp_path / f"copy-{copies}.sqlite3"
            copy_db(db, dest)
            got = sqlite3.connect(dest)
            try:
                assert got.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                count = got.execute("SELECT count(*) FROM t").fetchone()[0]
            finally:
                got.close()
            assert (count - 2000) % 200 == 0, f"copy {copies} holds part of a transaction: {count} rows"
            if mode == "wal":
                assert count == 2000 + 200 * 5
            dest.unlink()
            copies += 1
    finally:
        writer.communicate(input="\n", timeout=60)
    assert writer.returncode == 0

"""Many processes, one palace: zero failures, zero lost vectors (real processes, real files)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from palace.lock import UNSAFE_NO_LOCK_ENV

FSIZE_LIMIT = 2 << 30  # a torn HNSW index once wrote a 56 GB link_lists.bin; never let a test do that


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def spawn(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.workers", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=_limit_file_size, cwd=Path(__file__).resolve().parent.parent)


def result(proc: subprocess.Popen, timeout: float = 240) -> dict | None:
    """The worker's JSON result, or None if it crashed or hung (then it is killed)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    if proc.returncode != 0:
        print(err, file=sys.stderr)
        return None
    return json.loads(out.strip().splitlines()[-1])


def stress(location: str, kg: Path, env: dict | None = None, drawers: int = 2000, batch: int = 100) -> dict:
    procs = [spawn("kg", kg, f"k{i}", 50, env=env) for i in range(4)]
    procs += [spawn("drawers", location, f"d{i}", drawers, batch, i, kg, env=env) for i in range(2)]
    results = [result(p) for p in procs]
    check = result(spawn("self_query", location, f"d0:0:{drawers},d1:1:{drawers}", kg), timeout=180)
    return {"kg": results[:4], "drawers": results[4:], "check": check}


def integrity(db: Path) -> str:
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return c.execute("PRAGMA integrity_check").fetchone()[0]


# Self-query misses HNSW itself has, with one writer and nothing else (ef_search 100, random 384-d unit
# vectors): 1 in 20,000 at 20k (chroma-behaviour.md), 127 in 40,000 at 40k (measured 2026-12-02). A torn
# index loses 13-45%, so the bound sits just above what recall alone explains at each size.
RECALL_MISS_RATE = {2000: 0.001, 20000: 0.005}


def assert_no_loss(out: dict, drawers: int) -> None:
    assert all(r is not None and r["errors"] == 0 for r in out["kg"] + out["drawers"]), out
    check = out["check"]
    assert check is not None and check["errors"] == 0, out
    assert check["total"] == 2 * drawers
    assert check["misses"] <= RECALL_MISS_RATE[drawers] * check["total"], out  # findable by their own vector


def test_embedded_stress_loses_nothing(tmp_path):
    palace, kg = tmp_path / "p", tmp_path / "p" / "knowledge_graph.sqlite3"
    out = stress(str(palace), kg)
    assert_no_loss(out, 2000)
    assert integrity(palace / "chroma.sqlite3") == "ok" and integrity(kg) == "ok"
    with __import__("sqlite3").connect(kg) as c:
        assert c.execute("SELECT count(*) FROM triples").fetchone()[0] == 200
        assert c.execute("SELECT count(*) FROM entities WHERE type='stress'").fetchone()[0] == 200


@pytest.mark.slow
def test_embedded_stress_large(tmp_path):
    """The larger variant: 4 KG writers + 2 writers of 20,000 drawers each (pytest -m slow)."""
    palace, kg = tmp_path / "p", tmp_path / "p" / "knowledge_graph.sqlite3"
    out = stress(str(palace), kg, drawers=20000, batch=500)
    assert_no_loss(out, 20000)
    assert integrity(palace / "chroma.sqlite3") == "ok" and integrity(kg) == "ok"


def test_single_process_control(tmp_path):
    palace = tmp_path / "p"
    out = result(spawn("drawers", palace, "solo", 4000, 100, 7))
    check = result(spawn("self_query", palace, "solo:7:4000"))
    assert out["errors"] == 0 and check["total"] == 4000 and check["misses"] <= 4


def four_writers(palace: Path, env: dict | None = None) -> dict | None:
    """4 processes x 2,000 drawers in batches of 500 into one pre-created palace; the self-query check."""
    assert result(spawn("drawers", palace, "seed", 10, 10, 99))["errors"] == 0
    writers = [result(p) for p in [spawn("drawers", palace, f"w{i}", 2000, 500, i, env=env) for i in range(4)]]
    assert all(w is not None and w["errors"] == 0 for w in writers), writers  # no writer ever sees an error
    return result(spawn("self_query", palace, ",".join(f"w{i}:{i}:2000" for i in range(4))), timeout=180)


@pytest.mark.parametrize("lock", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["with-lock", "lock-off"])
def test_the_lock_is_what_prevents_silent_loss(tmp_path, lock):
    """The same 4-writer run: with the palace lock nothing is lost; with it switched off (a test-only
    switch that makes our writers behave like plain PersistentClient writers) Chroma silently tears
    the index -- the proof that the self-query check can fail. That proof depends on a race, so it
    runs with -m slow."""
    check = four_writers(tmp_path / "p", None if lock else {UNSAFE_NO_LOCK_ENV: "1"})
    if lock:
        assert check is not None and check["errors"] == 0 and check["misses"] <= 8, check
    else:  # a crash, a hang, query errors or misses: every one of them is lost vectors
        assert check is None or check["errors"] > 0 or check["misses"] > 0.01 * check["expected"], check


def test_server_mode_stress_loses_nothing(tmp_path, chroma_server):
    kg = tmp_path / "kg" / "knowledge_graph.sqlite3"
    procs = [spawn("drawers", chroma_server, f"s{i}", 1000, 100, i, kg) for i in range(4)]
    results = [result(p) for p in procs]
    assert all(r is not None and r["errors"] == 0 for r in results), results
    check = result(spawn("self_query", chroma_server, "s0:0:1000,s1:1:1000,s2:2:1000,s3:3:1000", kg))
    assert check["total"] == 4000 and check["misses"] <= 4 and check["errors"] == 0


def test_own_writes_never_look_external(tmp_path):
    assert result(spawn("own_writes", tmp_path / "own", 10))["client_creations"] == 1


def test_a_writer_lets_the_lock_go_only_once_its_writes_clock_tick_has_passed(tmp_path, monkeypatch):
    """After its own write a writer keeps the stamp of chroma.sqlite3, to tell next time whether
    anyone else wrote since. Before Linux 6.13 the stamp's mtime moves with a coarse clock tick, so
    a writer that took the lock just after ours and committed within the same tick would leave the
    stamp as it was, and our next write would persist our stale in-memory index over its rows. The
    lock is let go only once that tick has passed (widened here to 0.5 s)."""
    import numpy as np

    from palace import chroma_sqlite
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    monkeypatch.setattr(chroma_sqlite, "RACY_NS", 500_000_000)
    palace = tmp_path / "p"
    store = VectorStore(layout_for(palace))
    try:
        for batch in range(2):  # the first also creates the palace; the second writes into an open one
            vectors = np.random.default_rng(batch).standard_normal((3, 384)).astype(np.float32)
            store.upsert([f"d{batch}_{i}" for i in range(3)], ["memory"] * 3, [{"wing": "w"}] * 3, vectors)
            assert time.time_ns() - os.stat(palace / "chroma.sqlite3").st_mtime_ns >= 500_000_000
    finally:
        store.close()


@pytest.mark.slow
def test_reader_refreshes_at_most_once_per_window(tmp_path):
    """Wall-clock windows (a 12 s reader, 5 s refresh interval), so it runs with -m slow."""
    palace = tmp_path / "p"
    assert result(spawn("drawers", palace, "seed", 200, 100, 1))["errors"] == 0
    reader = spawn("reader", palace, 12, 5)
    time.sleep(1)
    for burst in range(4):  # a writer in bursts, 2 s apart
        assert result(spawn("drawers", palace, f"b{burst}", 100, 50, 10 + burst))["errors"] == 0
        time.sleep(1)
    r = result(reader)
    # the first open, then at most one re-open per 5 s window of a 12 s run
    assert r is not None and r["reads"] > 20
    assert 2 <= r["client_creations"] <= 1 + 3, r
    assert r["distinct_counts"] >= 2  # it did see the writer's rows
    check = result(spawn("self_query", palace, "seed:1:200,b0:10:100,b1:11:100,b2:12:100,b3:13:100"))
    assert check["misses"] == 0 and check["total"] == 600


def test_open_behind_a_sqlite_lock_fails_in_time_and_exits(tmp_path):
    """PersistentClient() waits up to 1,000 s behind another connection's lock; ours gives up, and exits."""
    import sqlite3

    palace = tmp_path / "p"
    assert result(spawn("drawers", palace, "x", 10, 10, 1))["errors"] == 0
    blocker = sqlite3.connect(palace / "chroma.sqlite3", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        code = ("from palace.layout import layout_for\nfrom palace.vectors import VectorStore\n"
                f"VectorStore(layout_for({str(palace)!r}), open_timeout=2).reading()")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parent.parent)  # the timeout only guards a hang
        assert proc.returncode != 0 and "stayed locked for 2s" in proc.stderr  # gave up after its own 2 s
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

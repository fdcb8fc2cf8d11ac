"""Writes beside a live MemPalace 3.11: through a real ``mempalace serve`` hub when one holds the
palace's lease (its own ``mempalace_add_drawer``), refused at once -- naming the holder -- beside a
stdio ``mempalace-mcp`` that cannot be reached, and ``--wait`` for the lease to come free."""
from __future__ import annotations

import collections
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from palace.stores import open_store

from .helpers import (
    SAMPLE,
    LiveHub,
    StdioMcp,
    cli_json,
    kill_mid_transaction,
    lease_held,
    palace_rows,
    run_cli,
)
from .test_live import add_drawer_call, drawer_id_of, fingerprint

ANIMALS = ["heron", "otter", "badger", "lynx", "marmot", "ibis", "gecko", "walrus", "okapi", "tapir"]
THINGS = ["lantern", "compass", "kettle", "ledger", "violin", "anchor", "telescope", "quilt", "abacus"]
LONG = " ".join(f"paragraph {n} of the long design note explains the backup window and its retention." for n in
                range(40))  # ~3,000 characters: the hub files it as chunk drawers


def memories(path: Path, n: int, tag: str, long_one: bool = False) -> list[dict]:
    rows = [{"id": f"{tag}-{i:04d}", "wing": "notes", "room": "hub",
             "text": f"{tag} note {i}: the {ANIMALS[i % 10]} keeps a {THINGS[i % 9]} numbered {i * 7919 % 10007}"}
            for i in range(n)]
    if long_one:
        rows.append({"id": f"{tag}-long", "wing": "notes", "room": "design", "text": LONG})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def documents(palace: Path) -> list[str]:
    store = open_store(palace, read_only=True)
    try:
        return [d for page in store.rows("drawers", ("document",)) for _, d, _ in page]
    finally:
        store.close()


def routed_count(palace: Path) -> int:
    path = palace / ".palace-etl" / "routed.sqlite3"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT count(*) FROM routed").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # not created yet


def test_an_import_beside_a_live_hub_goes_through_it_once(tmp_path):
    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    src = tmp_path / "notes.jsonl"
    rows = memories(src, 150, "hubbed", long_one=True)
    hub = LiveHub(palace).start()
    try:
        # the user filed one of these texts through MemPalace first: the hub answers our copy with
        # that drawer ("already_exists"), which palace-etl did not file and so never deletes
        theirs = hub.tool("mempalace_add_drawer", wing="notes", room="hub", content=rows[5]["text"],
                          added_by="agent")
        assert theirs["success"] and "reason" not in theirs
        # and the long note, which the hub keeps as chunks, whose ids its "already_exists" does not name
        assert hub.tool("mempalace_add_drawer", wing="notes", room="design", content=LONG)["chunks"] > 1
        r = cli_json("import", "jsonl", src, "--palace", palace, "--lock-timeout", "1")
        assert r["route"] == "hub" and r["drawers_written"] == 151 and r["vectors_embedded"] == 0
        assert any("vectors" in d for d in r["route_drops"]) and r["kg_rows_written"] == 0
        for row in rows[:3]:  # the hub's own search finds what went through it
            found = hub.tool("mempalace_search", query=row["text"], limit=3)["results"]
            assert found[0]["text"] == row["text"]
        again = cli_json("import", "jsonl", src, "--palace", palace, "--lock-timeout", "1")
        assert again["drawers_written"] == 0 and again["drawers_unchanged"] == 151
        # drawers imported directly earlier, under our ids: still themselves, nothing written
        direct = cli_json("import", "mcp-memory", SAMPLE, "--palace", palace, "--lock-timeout", "1")
        assert (direct["route"], direct["drawers_written"], direct["kg_rows_written"]) == ("hub", 0, 0)
        run_cli("verify", "--palace", palace, "--against", "jsonl", src, "--against", "mcp-memory", SAMPLE)
        docs = documents(palace)
        assert len(docs) == 363 + 150 + math.ceil(len(LONG) / 800)  # the hub files the long note as chunks
        assert all(collections.Counter(docs)[row["text"]] == 1 for row in rows[:-1])
        status = cli_json("status", "--palace", palace, "--probes", "1000")
        assert status["self_hit_rate"] == 1.0

        # a changed memory is filed anew and its old drawer goes; the user's drawer stays
        old_text, rows[0]["text"] = rows[0]["text"], "hubbed note 0, corrected: the heron keeps two lanterns"
        their_text, rows[5]["text"] = rows[5]["text"], "hubbed note 5, corrected: the gecko keeps a violin"
        src.write_text("".join(json.dumps(x) + "\n" for x in rows))
        edit = cli_json("import", "jsonl", src, "--palace", palace, "--lock-timeout", "1")
        assert edit["drawers_written"] == 2 and edit["drawers_unchanged"] == 149
        docs = documents(palace)
        assert rows[0]["text"] in docs and old_text not in docs
        assert rows[5]["text"] in docs and their_text in docs
        assert hub.tool("mempalace_get_drawer", drawer_id=theirs["drawer_id"])["content"] == their_text
        assert any(theirs["drawer_id"] in note and "did not file" in note for note in edit["route_notes"])

        # a mapping from before filings were recorded: the drawers carrying what palace-etl sent are
        # taken for its own, the user's are not
        text = "the user's own note: the okapi keeps the second quilt"
        users = hub.tool("mempalace_add_drawer", wing="notes", room="hub", content=text, added_by="agent")
        rows[2]["text"] = text
        src.write_text("".join(json.dumps(x) + "\n" for x in rows))
        assert cli_json("import", "jsonl", src, "--palace", palace, "--lock-timeout", "1")["drawers_written"] == 1
        with sqlite3.connect(palace / ".palace-etl" / "routed.sqlite3") as conn:
            conn.execute("DROP TABLE filed")
        old_text, rows[1]["text"] = rows[1]["text"], "hubbed note 1, corrected: the otter keeps a kettle"
        rows[2]["text"] = "hubbed note 2, corrected: the badger keeps a compass"
        src.write_text("".join(json.dumps(x) + "\n" for x in rows))
        edit = cli_json("import", "jsonl", src, "--palace", palace, "--lock-timeout", "1")
        assert edit["drawers_written"] == 2
        docs = documents(palace)
        assert rows[1]["text"] in docs and old_text not in docs and rows[2]["text"] in docs and text in docs
        assert any(users["drawer_id"] in note for note in edit["route_notes"])
        run_cli("verify", "--palace", palace, "--against", "jsonl", src)

        # the other routes, asked for by name
        forced = run_cli("import", "jsonl", src, "--palace", palace, "--via", "direct", "--lock-timeout", "1",
                         check=11)
        assert "held by PID" in forced.stderr
        assert drawer_id_of(httpx_post(hub.url, add_drawer_call(9, "the hub still writes after the imports")))
    finally:
        hub.stop()
    nohub = run_cli("import", "jsonl", src, "--palace", palace, "--via", "hub", check=1)
    assert "no writable MemPalace hub" in nohub.stderr and "mempalace serve" in nohub.stderr


def httpx_post(url: str, message: dict) -> dict:
    import httpx

    return httpx.post(url, json=message, timeout=120).json()


def test_a_hub_killed_mid_import_loses_and_duplicates_nothing(tmp_path):
    palace = tmp_path / "palace"
    palace.mkdir()
    src = tmp_path / "notes.jsonl"
    rows = memories(src, 150, "killed")
    hub = LiveHub(palace).start()
    try:
        job = subprocess.Popen([sys.executable, "-m", "etl.cli", "import", "jsonl", str(src), "--palace", str(palace),
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while routed_count(palace) < 20:
            assert job.poll() is None, job.stderr.read()
            assert time.monotonic() < deadline, "the routed import never got going"
            time.sleep(0.1)
        hub.kill()
        _, err = job.communicate(timeout=300)
        assert job.returncode == 1 and "stopped answering" in err, err
        assert 20 <= routed_count(palace) < 150
    finally:
        hub.stop()
    hub = LiveHub(palace).start()  # the same palace served again, on another port
    try:
        r = cli_json("import", "jsonl", src, "--palace", palace)
        assert r["route"] == "hub" and r["drawers_written"] + r["drawers_unchanged"] == 150
        assert r["drawers_unchanged"] >= 20
    finally:
        hub.stop()
    counts = collections.Counter(documents(palace))
    assert sorted(counts) == sorted(row["text"] for row in rows) and set(counts.values()) == {1}
    run_cli("verify", "--palace", palace, "--against", "jsonl", src)


def test_a_hub_refusing_a_palace_left_mid_transaction_is_put_right_not_sent_to_repair(tmp_path):
    """MemPalace 3.11's integrity gate reads chroma.sqlite3 read-only, cannot roll back the journal of
    a writer killed mid-transaction, and refuses every write as if the palace were corrupt. The import
    rolls the journal back the way SQLite does, has the hub re-check (mempalace_reconnect) and goes on."""
    palace = tmp_path / "palace"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    before = memories(first, 30, "before")
    cli_json("import", "jsonl", first, "--palace", palace)  # no server yet: written directly
    kill_mid_transaction(palace / "chroma.sqlite3")
    after = memories(second, 12, "after")
    hub = LiveHub(palace).start()
    try:
        refused = httpx_post(hub.url, add_drawer_call(1, "the hub refuses this on its own"))
        assert refused["error"]["code"] == -32002 and "readonly" in str(refused["error"]["data"]["errors"])
        r = cli_json("import", "jsonl", second, "--palace", palace)
        assert r["route"] == "hub" and r["drawers_written"] == 12 and r["quarantined"] == 0
        assert len(r["route_notes"]) == 1 and "rolled back" in r["route_notes"][0]
        assert not (palace / "chroma.sqlite3-journal").exists()
        assert drawer_id_of(httpx_post(hub.url, add_drawer_call(2, "the hub writes again on its own")))
        again = cli_json("import", "jsonl", second, "--palace", palace)
        assert again["drawers_unchanged"] == 12 and again["route_notes"] == []
    finally:
        hub.stop()
    texts = collections.Counter(documents(palace))
    assert set(texts.values()) == {1} and "torn" not in texts  # the interrupted update never happened
    assert {row["text"] for row in before + after} | {"the hub writes again on its own"} == set(texts)


def test_beside_a_stdio_server_writes_are_refused_at_once_and_wait_waits(tmp_path):
    palace, other = tmp_path / "palace", tmp_path / "other"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    src = tmp_path / "notes.jsonl"
    memories(src, 20, "waited")
    server = StdioMcp(palace)
    try:
        server.add_drawer("the stdio server filed this memory")
        assert lease_held(palace)
        # an hour's --lock-timeout is not waited: the holder is named at once, with the ways out
        refused = run_cli("import", "jsonl", src, "--palace", palace, "--lock-timeout", "3600", check=11, timeout=120)
        assert f"PID {server.pid}" in refused.stderr and "mempalace-mcp" in refused.stderr
        assert "mempalace serve" in refused.stderr and "--wait" in refused.stderr
        restore = run_cli("restore", tmp_path / "nothing", "--palace", palace, "--force", "--lock-timeout", "3600",
                          check=11, timeout=120)
        assert f"PID {server.pid}" in restore.stderr
        # a sync reads the live side from a private copy: fine while it writes only into the other side
        first = cli_json("sync", palace, other, "--lock-timeout", "3600")
        assert first["converged"] and first["plan"]["to_b"]["drawers"] == 364
        cli_json("import", "jsonl", src, "--palace", other)
        before = fingerprint(palace)
        back = run_cli("sync", palace, other, "--lock-timeout", "3600", check=11, timeout=120)
        assert f"PID {server.pid}" in back.stderr and "nothing written" in back.stderr
        assert {k: v for k, v in fingerprint(palace).items() if not k.startswith(".palace-etl")} == \
            {k: v for k, v in before.items() if not k.startswith(".palace-etl")}

        waiting = subprocess.Popen([sys.executable, "-m", "etl.cli", "import", "jsonl", str(src), "--palace",
                                    str(palace), "--wait", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env={**os.environ})
        assert "waiting for PID" in waiting.stderr.readline()
        assert waiting.poll() is None
    finally:
        server.close()
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    r = json.loads(out)
    assert (r["route"], r["drawers_written"], r["vectors_embedded"]) == ("direct", 20, 20)
    run_cli("verify", "--palace", palace, "--against", "jsonl", src, "--against", "mcp-memory", SAMPLE)
    done = cli_json("sync", palace, other)
    assert done["converged"]


def test_the_ways_out_are_named_for_a_hub_a_sync_cannot_use(tmp_path):
    """A sync carries ids and vectors, which a hub cannot take: beside one it reads, and refuses to write."""
    palace, mirror = tmp_path / "palace", tmp_path / "mirror"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    hub = LiveHub(palace).start()
    try:
        out = cli_json("sync", palace, f"bundle:{mirror}")
        assert out["converged"] and out["plan"]["to_b"]["drawers"] == 363
        src = tmp_path / "notes.jsonl"
        memories(src, 5, "mirror")
        side = tmp_path / "side"
        cli_json("import", "jsonl", src, "--palace", side)
        back = run_cli("sync", side, palace, check=11)
        assert "MemPalace hub" in back.stderr and "ids and vectors" in back.stderr
        assert "--wait" in back.stderr
        # forget deletes by id and scrubs the files, which no hub tool does: refused at once; its
        # dry run and a diff read the private copy
        (victim,) = list(palace_rows(palace))[:1]
        dry = cli_json("forget", "--palace", palace, "--id", victim, "--dry-run")
        assert dry["removed"]["drawers"] == [victim]
        refused = run_cli("forget", "--palace", palace, "--id", victim, "--lock-timeout", "3600", check=11,
                          timeout=120)
        assert "MemPalace hub" in refused.stderr and "--wait" in refused.stderr
        assert cli_json("diff", palace, f"bundle:{mirror}")["same"]
    finally:
        hub.stop()
    assert victim in palace_rows(palace)


def test_wait_is_spelled_the_same_on_every_verb_that_writes_a_palace():
    for verb in (("import", "jsonl"), ("restore",), ("sync",), ("forget",)):
        assert "--wait" in run_cli(*verb, "--help").stdout
    assert "--via" in run_cli("import", "auto", "--help").stdout


def test_an_import_beside_a_live_daemon_goes_through_its_queue(tmp_path):
    """MemPalace's daemon (what ``mempalace daemon start`` runs) holds the lease for life; drawers go
    through its ``mcp_tool`` jobs, and a re-run writes nothing."""
    from palace.live import live_daemon

    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    src = tmp_path / "notes.jsonl"
    rows = memories(src, 40, "queued")
    log = open(tmp_path / "daemon.log", "wb")  # never a pipe nobody reads: it would stall the daemon
    daemon = subprocess.Popen([sys.executable, "-m", "mempalace.daemon", "serve", "--palace", str(palace)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (lease_held(palace) and live_daemon(palace)):
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the daemon never took the palace lease"
            time.sleep(0.2)
        r = cli_json("import", "jsonl", src, "--palace", palace, "--lock-timeout", "1")
        assert (r["route"], r["drawers_written"], r["vectors_embedded"]) == ("daemon", 40, 0)
        again = cli_json("import", "jsonl", src, "--palace", palace, "--via", "daemon")
        assert again["drawers_written"] == 0 and again["drawers_unchanged"] == 40
        run_cli("verify", "--palace", palace, "--against", "jsonl", src, "--against", "mcp-memory", SAMPLE)
        assert cli_json("sync", palace, tmp_path / "side", "--dry-run")["plan"]["to_b"]["drawers"] == 403
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        log.close()
    counts = collections.Counter(documents(palace))
    assert all(counts[row["text"]] == 1 for row in rows)

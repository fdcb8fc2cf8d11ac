"""Reads beside a live MemPalace 3.11: a real ``mempalace serve`` hub on 127.0.0.1 holds the palace's
writer lease for its whole life, and export, verify and status still work -- from a private copy,
without the lock -- and leave every byte and mtime of the live palace as it was."""
from __future__ import annotations

import hashlib
import json
import os
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
    from palace.stores import chroma_dir

    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    real, calls = chroma_dir._segment_stamps, []

    def moving(path):
        calls.append(path)
        stamps = real(path)
        return {**stamps, "torn": (len(calls), 0)} if len(calls) <= 2 else stamps  # the first try is torn

    monkeypatch.setattr(chroma_dir, "_segment_stamps", moving)
    copy = chroma_dir.take_copy(palace)
    try:
        assert len(calls) == 4  # before/after of a torn try, then of a clean one
        assert (copy / "chroma.sqlite3").exists()
    finally:
        import shutil

        shutil.rmtree(copy)


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

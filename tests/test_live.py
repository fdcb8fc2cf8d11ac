"""Reads beside a live MemPalace 3.11: a real ``mempalace serve`` hub on 127.0.0.1 holds the palace's
writer lease for its whole life, and export, verify and status still work -- from a private copy,
without the lock -- and leave every byte and mtime of the live palace as it was."""
from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from palace.lock import lock_path

from .helpers import REPO, cli_json, free_port, run_cli

BIN = Path(sys.executable).parent
SAMPLE = REPO / "sample_data/mcp-memory/memory.jsonl"


def lease_held(palace: Path) -> bool:
    path = lock_path(palace)
    if not path.exists():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def fingerprint(palace: Path) -> dict[str, tuple[str, int]]:
    """Every file of the palace: its sha256 and mtime."""
    return {str(p.relative_to(palace)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(palace.rglob("*")) if p.is_file()}


@pytest.fixture
def served_palace(tmp_path):
    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    hub = subprocess.Popen([str(BIN / "mempalace"), "serve", "--palace", str(palace), "--host", "127.0.0.1",
                            "--port", str(free_port())], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env={**os.environ, "MEMPALACE_SYNC_INTERVAL": "3600"})
    try:
        deadline = time.monotonic() + 120
        while not lease_held(palace):
            assert hub.poll() is None, hub.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the hub never took the palace lease"
            time.sleep(0.2)
        yield palace
    finally:
        hub.terminate()
        try:
            hub.wait(timeout=30)
        except subprocess.TimeoutExpired:
            hub.kill()
            hub.wait()


def test_export_verify_status_beside_a_live_hub_leave_the_palace_untouched(served_palace, tmp_path):
    palace = served_palace
    time.sleep(1.0)  # whatever the hub writes when it starts, it has written
    before = fingerprint(palace)
    r = cli_json("export", "--palace", palace, "--out", tmp_path / "b", "--lock-timeout", "1")
    assert r["totals"]["drawers"] == 363 and r["totals"]["triples"] == 223
    incr = cli_json("export", "--palace", palace, "--out", tmp_path / "b", "--incremental", "--lock-timeout", "1")
    assert incr["kind"] == "incremental" and sum(incr["counts"].values()) == 0
    run_cli("verify", "--palace", palace, "--against", "mcp-memory", SAMPLE, "--lock-timeout", "1")
    status = cli_json("status", "--palace", palace, "--probes", "20", "--lock-timeout", "1")
    assert status["drawers"] == 363 and status["self_hit_rate"] == 1.0
    assert lease_held(palace)  # the hub held its lease the whole time
    after = fingerprint(palace)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, changed  # nothing locked, written, renamed or re-stamped
    cli_json("restore", r["bundle"], "--palace", tmp_path / "restored")
    run_cli("verify", "--palace", tmp_path / "restored", "--against", "mcp-memory", SAMPLE)


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

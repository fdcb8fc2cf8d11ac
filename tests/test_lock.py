"""The palace writer lock interoperates with MemPalace 3.11's own lock, both ways."""
import subprocess
import sys

from palace.lock import lock_path, palace_lock

from .helpers import BIN, CORPUS, cli_json, run_cli

MEMORY = CORPUS / "mcp-memory" / "memory.jsonl"

HOLD_WITH_MEMPALACE = """
import sys, time
from mempalace.palace import mine_palace_lock
with mine_palace_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_same_lock_file_as_mempalace(tmp_path):
    code = f"""
import os
from mempalace.palace import mine_palace_lock
with mine_palace_lock({str(tmp_path)!r}):
    print(sorted(os.listdir(os.path.expanduser("~/.mempalace/locks"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert lock_path(tmp_path).name in out.stdout


def test_import_waits_then_exits_11_naming_mempalace(tmp_path):
    palace = tmp_path / "p"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WITH_MEMPALACE, str(palace), "30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("import", "mcp-memory", MEMORY, "--palace", palace, "--lock-timeout", "1.5", check=11)
        assert "waited 1.5s" in proc.stderr  # it waited its whole timeout (the lock says so), then gave up
        assert f"PID {holder.pid}" in proc.stderr and "held by" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    # the refused attempt left the earlier complete run as it was (no false "interrupted")
    assert [r["status"] for r in cli_json("status", "--palace", palace)["runs"]] == ["complete"]
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace)  # free again: it goes through


def test_mempalace_mine_is_refused_while_we_hold_the_lock(tmp_path):
    palace = tmp_path / "p"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.md").write_text("# Notes\n\nSome project notes long enough to be mined as one chunk.\n" * 5)
    with palace_lock(palace):
        proc = subprocess.run([str(BIN / "mempalace"), "--palace", str(palace), "mine", str(project)],
                              capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "held by" in (proc.stdout + proc.stderr)


def test_lock_is_reentrant_and_released(tmp_path):
    with palace_lock(tmp_path):
        with palace_lock(tmp_path, timeout=0):
            pass
    code = f"from palace.lock import palace_lock\nwith palace_lock({str(tmp_path)!r}, timeout=0): print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr

"""Every command the README shows is run here (the two setup commands are run by .ci/run)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .helpers import REPO, SAMPLE, LiveHub, cli_json, free_port, wait_for_chroma

README = (REPO / "README.md").read_text()
BIN = str(Path(sys.executable).parent) + "/"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_readme_starts_with_the_two_setup_commands():
    head = README.split("\n## ", 1)[0]
    sh = blocks("sh")
    assert len(re.findall(r"```sh\n", head)) == 2 and len(sh) == 2
    demo, tests = (b.strip() for b in sh)
    assert "\n" not in demo and "\n" not in tests
    assert "sample_data/" in demo and "verify" in demo
    assert "pytest" in tests and ".[test]" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci  # .ci/run takes both commands from this file


def test_crontab_line(tmp_path):
    """The crontab line, run twice while a real MemPalace hub serves the palace (and writes to it)."""
    (line,) = [b.strip() for b in blocks("text") if b.startswith("30 3 * * *")]
    command = line.split(" ", 5)[5]
    palace, backups, log = tmp_path / "palace", tmp_path / "backups", tmp_path / "verify.json"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    command = (command.replace("/opt/palace-etl/.venv/bin/", BIN).replace("/srv/palace", str(palace))
               .replace("/backups/palace", str(backups)).replace("/var/log/palace-verify.json", str(log)))
    hub = LiveHub(palace).start()
    try:
        for n in range(2):
            subprocess.run(["bash", "-c", command], check=True, timeout=300)
            assert hub.tool("mempalace_add_drawer", wing="cron", room="night", content=f"written after run {n}")[
                "success"]
    finally:
        hub.stop()
    bundles = sorted(backups.glob("palace-*"))
    assert [b.name.rsplit("-", 1)[1] for b in bundles] == ["full", "incr"]
    assert '"ok": true' in log.read_text()


def test_server_mode_block(tmp_path):
    (block,) = [b for b in blocks("text") if b.startswith("chroma run")]
    port = str(free_port())
    memory = tmp_path / "memory.jsonl"
    memory.write_bytes(SAMPLE.read_bytes())
    lines = [l.replace("8000", port).replace("/srv/palace", str(tmp_path / "srv")) for l in block.strip().splitlines()]
    server = subprocess.Popen([BIN + lines[0].split()[0], *lines[0].split()[1:]], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for_chroma(f"http://127.0.0.1:{port}", server)
        for line in lines[1:]:
            proc = subprocess.run(["bash", "-c", BIN + line], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stderr
        assert "363 drawers" in proc.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sync_block(tmp_path):
    (block,) = [b for b in blocks("text") if b.startswith("palace-etl sync")]
    home_palace, shared = tmp_path / "laptop-palace", tmp_path / "shared"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", home_palace)
    for line in block.strip().splitlines():
        line = line.replace("~/.mempalace/palace", str(home_palace)).replace("/mnt/shared/palace-sync", str(shared))
        proc = subprocess.run(["bash", "-c", BIN + line], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert "no problems found" in proc.stderr
    assert len(list(shared.glob("palace-*"))) == 1


def test_generic_tables_block(tmp_path, embedder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (block,) = [b for b in blocks("text") if b.startswith("palace-etl import csv")]
    (tmp_path / "notes.csv").write_text("body,project,when\nStandup moved to 09:30,team,2025-05-01T09:00:00Z\n")
    texts = ["The VPN needs the hardware key", "Backups run at 02:00"]
    pq.write_table(pa.table({"text": texts, "vec": [v.tolist() for v in embedder.embed(texts)]}),
                   tmp_path / "vectors.parquet")
    for line in block.strip().splitlines():
        line = line.replace("~/.mempalace/palace", str(tmp_path / "palace"))
        proc = subprocess.run(["bash", "-c", BIN + line], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no problems found" in proc.stderr
    status = cli_json("status", "--palace", tmp_path / "palace")
    assert sum(sum(rooms.values()) for rooms in status["wings"].values()) == 3


def test_exit_code_table_matches_the_cli_help():
    from etl.errors import EXIT_CODES_HELP

    section = README.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    table = [int(c) for c in re.findall(r"^\| (\d+) \|", section, re.M)]
    assert table == [int(c) for c in re.findall(r"(\d+) [a-z]", EXIT_CODES_HELP)]


def test_migrate_block(tmp_path, postgres, monkeypatch):
    """The README's move to PostgreSQL, run as written (paths and DSN swapped for the test's own)."""
    (line,) = [b.strip() for b in blocks("text") if b.startswith("palace-etl migrate")]
    monkeypatch.setenv("MEMPALACE_PGVECTOR_DSN", postgres)
    old, new = tmp_path / "palace", tmp_path / "palace-pg"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", old)
    proc = subprocess.run(["bash", "-c", BIN + line.replace("~/.mempalace/palace", str(old))
                           .replace("/srv/palace-pg", str(new))], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (new / "pgvector_backend.json").is_file()
    assert cli_json("status", "--palace", new)["drawers"] == 363

"""Every command the README shows is run here (the two setup commands are run by .ci/run)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .helpers import (
    REPO,
    SAMPLE,
    LiveHub,
    cli_json,
    free_port,
    run_cli,
    wait_for_chroma,
)

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


def shell(line: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
    return proc


def add_notes(palace: Path, tmp_path: Path, wing: str, texts: list[str]) -> None:
    notes = tmp_path / f"{wing}-{len(texts)}.csv"
    notes.write_text("text\n" + "".join(f"{t}\n" for t in texts))
    cli_json("import", "csv", notes, "--palace", palace, "--wing", wing)


def test_encrypted_block_and_crontab_line(tmp_path):
    """The encrypted-bundle commands as written, then the encrypted nightly line run on two nights
    with a memory filed between them: the second night's mail holds exactly that memory."""
    (block,) = [b for b in blocks("text") if b.startswith("palace-etl key new")]
    (line,) = [b.strip() for b in blocks("text") if b.startswith("0 4 * * *")]
    palace, backups, key = tmp_path / "palace", tmp_path / "backups", tmp_path / "config" / "backup.key"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    add_notes(palace, tmp_path, "project_x", ["The launch moved to Thursday"])
    shell(f"{BIN}palace-etl key new sam.key > sam.pub", tmp_path)

    def swap(text: str) -> str:
        return (text.replace("~/.config/palace-etl/backup.key", str(key)).replace("/srv/palace-restored",
                str(tmp_path / "restored")).replace("/srv/palace", str(palace)).replace("/backups/palace", str(backups))
                .replace("/mnt/shared/for-sam", str(tmp_path / "for-sam")))

    outs = [shell(BIN + swap(cmd), tmp_path) for cmd in block.strip().splitlines()]
    assert oct(key.stat().st_mode & 0o777) == "0o600" and outs[0].stdout == ""  # the public key went to the file
    assert (tmp_path / "backup.pub").read_text().startswith("age1")
    assert "no problems found" in outs[2].stderr + outs[3].stderr
    assert cli_json("status", "--palace", tmp_path / "restored")["drawers"] == 364
    (sam,) = (tmp_path / "for-sam").glob("palace-*")
    manifest = (sam / "manifest.json").read_text()
    assert "project_x" not in manifest and "Thursday" not in manifest  # even the wing's name is sealed
    assert "Thursday" in run_cli("diff", sam, "--identity", tmp_path / "sam.key").stdout

    cron = tmp_path / "cron"
    pub, secret = cron / "backup.pub", cron / "backup.key"
    cron.mkdir()
    pub.write_text(shell(f"{BIN}palace-etl key new {secret}", tmp_path).stdout)
    command = line.split(" ", 5)[5]
    command = (command.replace("/opt/palace-etl/.venv/bin/", BIN).replace("/srv/palace", str(palace))
               .replace("/backups/palace", str(cron / "backups")).replace("/etc/palace-etl", str(cron)))
    assert 'mail -s "what my agents learned today" me@example.org' in command
    for night in (1, 2):
        shell(command.replace('mail -s "what my agents learned today" me@example.org', f"cat > mail-{night}.txt"),
              tmp_path)
        add_notes(palace, tmp_path, "diary", ["Sam prefers the window seat"] * night)
    first, second = (tmp_path / "mail-1.txt").read_text(), (tmp_path / "mail-2.txt").read_text()
    assert first.startswith("(nothing") and "drawers +364 -0 ~0" in first
    assert "drawers +1 -0 ~0" in second and "Sam prefers the window seat" in second
    assert all(p.suffix == ".age" or p.name == "manifest.json" or p.is_dir()
               for b in (cron / "backups").glob("palace-*") for p in b.rglob("*"))


def test_diff_and_forget_blocks(tmp_path, embedder):
    """The diff and forget sections as written: two nightly bundles and a synced shared disk, then
    a memory forgotten everywhere: palace, both bundles, and the replica the sync reaches."""
    from .test_forget import WORD, holding, secret_palace

    (diff_block,) = [b for b in blocks("text") if b.startswith("palace-etl diff")]
    (forget_block,) = [b for b in blocks("text") if b.startswith("palace-etl forget")]
    palace, backups, shared = secret_palace(tmp_path / "palace", embedder), tmp_path / "backups", tmp_path / "shared"
    full = Path(cli_json("export", "--palace", palace, "--out", backups)["bundle"])
    add_notes(palace, tmp_path, "diary", ["Sam prefers the window seat"])
    incr = Path(cli_json("export", "--palace", palace, "--out", backups, "--incremental")["bundle"])
    cli_json("sync", palace, f"bundle:{shared}")
    add_notes(palace, tmp_path, "errands", ["The office closes at six"])

    def swap(text: str) -> str:
        return (text.replace("/backups/palace/palace-20261201T040001000000Z-full", str(full))
                .replace("/backups/palace/palace-20261202T040001000000Z-incr", str(incr))
                .replace("~/.mempalace/palace", str(palace)).replace("/mnt/shared/palace-sync", str(shared)))

    one, two, stat = (shell(BIN + swap(cmd), tmp_path).stdout for cmd in diff_block.strip().splitlines())
    assert one == two and "+ " in one and "Sam prefers the window seat" in one
    assert "  errands: +0 -1 ~0" in stat.splitlines()  # the shared disk has not seen the later note

    outs = [shell(BIN + swap(cmd), tmp_path) for cmd in forget_block.strip().splitlines()]
    assert "would erase" in outs[0].stdout and "erased" in outs[1].stdout
    for where in (palace, backups, shared):
        assert holding(where, WORD) == [], where
    assert cli_json("verify", "--bundle", incr)["ok"] and cli_json("verify", "--palace", palace)["ok"]

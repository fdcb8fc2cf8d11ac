"""CLI conventions: --json, exit codes, sources, status, verify findings."""
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from palace.layout import layout_for
from palace.vectors import VectorStore

from .helpers import CORPUS, SAMPLE, cli_json, run_cli

MEMORY = CORPUS / "mcp-memory" / "memory.jsonl"


def test_sources_lists_importers():
    names = {r["name"] for r in cli_json("sources")["importers"]}
    assert "mcp-memory" in names
    assert "mcp-memory" in run_cli("sources").stdout


def test_missing_source_exits_10(tmp_path):
    proc = run_cli("import", "mcp-memory", tmp_path / "nope.jsonl", "--palace", tmp_path / "p", check=10)
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_usage_error_exits_2(tmp_path):
    run_cli("import", "mcp-memory", "--palace", tmp_path / "p", check=2)


def test_status_json(tmp_path):
    palace = tmp_path / "p"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace, "--wing", "old memory")
    s = cli_json("status", "--palace", palace)
    assert s["drawers"] == 47 and sum(s["wings"]["old memory"].values()) == 47
    assert s["kg"]["entities"] == 12 and s["kg"]["triples"] == 13
    assert s["embedder"] == "minilm/384"
    assert "old memory" in run_cli("status", "--palace", palace).stdout


def test_kg_elsewhere(tmp_path):
    palace, kg = tmp_path / "p", tmp_path / "global" / "knowledge_graph.sqlite3"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace, "--kg", kg)
    assert kg.exists() and not (palace / "knowledge_graph.sqlite3").exists()
    assert cli_json("status", "--palace", palace, "--kg", kg)["kg"]["triples"] == 13


def test_verify_finds_a_deleted_drawer_and_a_dropped_triple(tmp_path):
    palace = tmp_path / "p"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace)
    clean = run_cli("verify", "--palace", palace, "--against", "mcp-memory", MEMORY)
    assert "no problems found" in clean.stderr
    import chromadb

    client = chromadb.PersistentClient(str(palace))
    col = client.get_collection("mempalace_drawers")
    victim = col.get(limit=1)["ids"][0]
    col.delete(ids=[victim])
    client.close()
    with sqlite3.connect(palace / "knowledge_graph.sqlite3") as c:
        c.execute("DELETE FROM triples WHERE predicate='created_by'")
    proc = run_cli("verify", "--palace", palace, "--against", "mcp-memory", MEMORY, "--json", check=4)
    report = json.loads(proc.stdout)
    codes = {f["code"]: f for f in report["findings"]}
    assert victim in codes["drawer_missing"]["message"]
    assert "palace-etl import mcp-memory" in codes["drawer_missing"]["remedy"]
    assert "triple_missing" in codes
    assert report["schema_version"] == 1 and not report["ok"]
    run_cli("import", "mcp-memory", MEMORY, "--palace", palace)  # the remedy fixes it
    run_cli("verify", "--palace", palace, "--against", "mcp-memory", MEMORY)


def test_verify_missing_palace_exits_10(tmp_path):
    run_cli("verify", "--palace", tmp_path / "nothing", check=10)


def test_verify_against_uses_the_wing_the_import_used(tmp_path):
    palace = tmp_path / "p"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace, "--wing", "old memory")
    assert "no problems found" in run_cli("verify", "--palace", palace, "--against", "mcp-memory", MEMORY).stderr
    proc = run_cli("verify", "--palace", palace, "--against", "mcp-memory", MEMORY, "--wing", "mcp_memory",
                   "--json", check=4)
    missing = {f["code"]: f for f in json.loads(proc.stdout)["findings"]}["drawer_missing"]
    assert "47 of 47" in missing["message"] and "--wing 'mcp_memory'" in missing["remedy"]


def test_verify_against_several_source_files_in_one_run(tmp_path):
    lines = Path(SAMPLE).read_text().splitlines(keepends=True)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text("".join(lines[::2]))
    two.write_text("".join(lines[1::2]))
    palace = tmp_path / "p"
    cli_json("import", "mcp-memory", one, "--palace", palace, "--wing", "first")
    cli_json("import", "mcp-memory", two, "--palace", palace, "--wing", "second")
    assert "no problems found" in run_cli("verify", "--palace", palace, "--against", "mcp-memory", one, two).stderr
    with sqlite3.connect(palace / "chroma.sqlite3") as conn:
        victim = conn.execute("SELECT e.embedding_id FROM embeddings e JOIN embedding_metadata m ON m.id = e.id "
                              "WHERE m.key = 'wing' AND m.string_value = 'second' LIMIT 1").fetchone()[0]
    store = VectorStore(layout_for(palace))
    store.delete([victim])
    store.close()
    proc = run_cli("verify", "--palace", palace, "--against", "mcp-memory", one, two, "--json", check=4)
    missing = {f["code"]: f for f in json.loads(proc.stdout)["findings"]}["drawer_missing"]
    assert victim in missing["message"] and f"mcp-memory {two}" in missing["remedy"]
    assert "--wing 'second'" in missing["remedy"]
    run_cli("verify", "--palace", palace, one, check=2)  # extra paths without --against


def test_cli_start_up_imports_no_importer_module():
    """Every command (cron runs several) starts without loading pyarrow and the 15 importers."""
    code = ("import sys, etl.cli.app; "
            "print(sorted(m for m in sys.modules if m.startswith('importers.') or m in ('pyarrow', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['importers.registry']"


def test_an_option_is_spelled_once_per_verb_and_means_one_kind_of_value_on_every_verb():
    """``forget`` once had ``--kg PATH`` and a ``--kg`` flag: the flag won and the path could not
    be given. Every option appears once per verb, and is a flag on all verbs or on none."""
    import typer.main

    from etl.cli.app import app

    kinds: dict[str, set[bool]] = {}

    def walk(cmd, path: str) -> None:
        if hasattr(cmd, "commands"):  # a group (typer's own click types)
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")
            return
        names = [o for p in cmd.params for o in p.opts + p.secondary_opts]
        assert len(names) == len(set(names)), (path, sorted(n for n in names if names.count(n) > 1))
        for p in cmd.params:
            for o in p.opts:
                kinds.setdefault(o, set()).add(getattr(p, "is_flag", False))

    walk(typer.main.get_command(app), "palace-etl")
    assert "--kg" in kinds and {o: k for o, k in kinds.items() if len(k) > 1} == {}

"""Server mode: --palace http://127.0.0.1:PORT works wherever a palace directory does."""
import json

from .helpers import SAMPLE, cli_json, free_port, run_cli


def test_import_status_verify_against_a_chroma_server(tmp_path, chroma_server):
    kg = tmp_path / "kg" / "knowledge_graph.sqlite3"
    args = ("--palace", chroma_server, "--kg", kg)
    first = cli_json("import", "mcp-memory", SAMPLE, *args)
    assert first["drawers_written"] == 363 and first["quarantined"] == 0
    assert cli_json("import", "mcp-memory", SAMPLE, *args)["drawers_written"] == 0
    status = cli_json("status", *args)
    assert status["drawers"] == 363 and status["embedder"] == "minilm/384"
    assert status["kg"]["triples"] == 223
    proc = run_cli("verify", *args, "--against", "mcp-memory", SAMPLE, "--json")
    report = json.loads(proc.stdout)
    assert report["ok"] and report["totals"]["self_hit_rate"] == 1.0
    assert any("server palace" in n for n in report["not_checked"])


def test_server_palace_needs_a_kg_path(chroma_server):
    proc = run_cli("status", "--palace", chroma_server, check=1)
    assert "needs --kg PATH" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_server_exits_10(tmp_path):
    port = free_port()
    proc = run_cli("import", "mcp-memory", SAMPLE, "--palace", f"http://127.0.0.1:{port}", "--kg",
                   tmp_path / "kg.sqlite3", check=10)
    assert "no Chroma server answers" in proc.stderr and "Traceback" not in proc.stderr


def test_export_from_and_restore_into_a_server(tmp_path, chroma_server):
    from palace.stores import open_store

    kg = tmp_path / "kg" / "knowledge_graph.sqlite3"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", chroma_server, "--kg", kg)
    r = cli_json("export", "--palace", chroma_server, "--kg", kg, "--out", tmp_path / "backups")
    assert r["counts"]["drawers"] == 363 and r["counts"]["triples"] == 223
    local = tmp_path / "restored"
    cli_json("restore", r["bundle"], "--palace", local)
    server_state = open_store(chroma_server, kg).snapshot()
    assert open_store(str(local)).snapshot() == server_state
    run_cli("verify", "--palace", local, "--against", "mcp-memory", SAMPLE)
    # restoring over a server that holds a palace is refused (it cannot be set aside like a directory)
    proc = run_cli("restore", r["bundle"], "--palace", chroma_server, "--kg", kg, check=1)
    assert "already holds a palace" in proc.stderr and "Traceback" not in proc.stderr
    human = cli_json("export", "--palace", chroma_server, "--kg", kg, "--out", tmp_path / "md", "--format", "markdown")
    assert human["drawers"] == 363 and (tmp_path / "md" / "index.md").exists()


def test_restore_into_an_empty_server(tmp_path, chroma_server):
    from palace.stores import open_store

    local = tmp_path / "local"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", local)
    bundle = cli_json("export", "--palace", local, "--out", tmp_path / "b")["bundle"]
    kg = tmp_path / "server-kg" / "knowledge_graph.sqlite3"
    assert cli_json("restore", bundle, "--palace", chroma_server, "--kg", kg)["rows"]["drawers"] == 363
    assert open_store(chroma_server, kg).snapshot() == open_store(str(local)).snapshot()
    assert cli_json("status", "--palace", chroma_server, "--kg", kg)["embedder"] == "minilm/384"

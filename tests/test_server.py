"""Server mode: --palace http://127.0.0.1:PORT works wherever a palace directory does."""
import json

from .helpers import cli_json, run_cli, SAMPLE


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
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run_cli("import", "mcp-memory", SAMPLE, "--palace", f"http://127.0.0.1:{port}", "--kg",
                   tmp_path / "kg.sqlite3", check=10)
    assert "no Chroma server answers" in proc.stderr and "Traceback" not in proc.stderr

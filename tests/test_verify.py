"""verify and status detect a palace whose vector index was damaged by another tool."""
import json
import shutil
from pathlib import Path

import orjson

from .helpers import cli_json, run_cli


def _memory(path: Path, docs: list[str]) -> None:
    path.write_bytes(b"\n".join(orjson.dumps({"type": "entity", "name": f"topic {i // 10}", "entityType": "note",
                                              "observations": docs[i:i + 10]}) for i in range(0, len(docs), 10)))


def _segment(palace: Path) -> Path:
    (seg,) = [d for d in palace.iterdir() if d.is_dir() and (d / "header.bin").exists()]
    return seg


def test_hnsw_of_another_palace_is_detected(tmp_path):
    """Copy palace B's persisted HNSW files over palace A's: SQLite is intact, the index lies."""
    docs = [f"memory {i}: the palace drawer about topic {i % 37} and host {i % 11}" for i in range(1200)]
    a_src, b_src = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _memory(a_src, docs)
    _memory(b_src, list(reversed(docs)))
    a, b = tmp_path / "A", tmp_path / "B"
    cli_json("import", "mcp-memory", a_src, "--palace", a)
    cli_json("import", "mcp-memory", b_src, "--palace", b, "--wing", "mcp_memory")
    run_cli("verify", "--palace", a)
    for f in _segment(b).iterdir():
        shutil.copy2(f, _segment(a) / f.name)
    report = json.loads(run_cli("verify", "--palace", a, "--json", check=4).stdout)
    miss = {f["code"]: f for f in report["findings"]}["hnsw_self_query_miss"]
    assert "repair rebuild-index" in miss["remedy"]
    assert report["totals"]["self_hit_rate"] < 0.5
    status = cli_json("status", "--palace", a, "--probes", "100")
    assert status["self_hit_rate"] < 0.5 and status["client_creations"] == 1

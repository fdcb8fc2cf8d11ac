"""The MCP memory server importer on the real corpus file and on broken input."""
import json
from pathlib import Path

import orjson

from importers.base import ImportOptions
from importers.mcp_memory import McpMemoryImporter
from importers.quarantine import Quarantine
from importers.schema import DRAWERS, ENTITIES, TRIPLES, validate_batch

from .helpers import CORPUS, FIXTURES, REPO, kg_rows, palace_rows, run_cli

MEMORY = CORPUS / "mcp-memory" / "memory.jsonl"
BROKEN = FIXTURES / "mcp-memory" / "broken.jsonl"

# Counted by reading memory.jsonl (14 entity lines, 13 relation lines):
# observations per entity line 13,5,5,3,5,2,3,1,2,2,1,2,1,2 = 47, none repeated;
# 7 distinct entity names + 5 relation endpoints never declared (GitHub Pages,
# Mike Bostock, Observable, Anthropic, Claude Desktop) = 12 KG entities.
CORPUS_ROOMS = {"project": 13, "reference": 5, "dependency": 7, "technology": 6, "tracker": 10, "library": 2,
                "service": 2, "tool": 2}


def collect(path: Path, **opts):
    q = Quarantine()
    out = {DRAWERS: [], ENTITIES: [], TRIPLES: []}
    for batch in McpMemoryImporter().batches(path, ImportOptions(**opts), q):
        out[validate_batch(batch)].extend(batch.to_pylist())
    return out, q


def test_corpus_rows():
    rows, q = collect(MEMORY)
    assert q.count == 0
    assert len(rows[DRAWERS]) == 47
    rooms = {}
    for d in rows[DRAWERS]:
        rooms[d["room"]] = rooms.get(d["room"], 0) + 1
        assert d["wing"] == "mcp_memory" and d["origin_system"] == "mcp-memory"
    assert rooms == CORPUS_ROOMS
    ents = {e["name"]: e for e in rows[ENTITIES]}
    assert len(ents) == 7
    assert ents["D3.js"]["type"] == "technology"
    assert json.loads(ents["D3.js"]["properties"]) == {"entityTypes": ["technology", "library"]}
    assert json.loads(ents["mcp-server-memory"]["properties"]) == {"entityTypes": ["dependency", "service", "tool"]}
    assert "зонтичный-issue-7" in ents
    assert len(rows[TRIPLES]) == 13
    preds = {t["predicate"] for t in rows[TRIPLES]}
    assert {"visualizes_data_from", "created_by", "reverse-engineered_from"} <= preds
    assert any(d["document"].startswith("server-memory-editor (project): Веб-визуализатор") for d in rows[DRAWERS])


def test_deterministic_and_detected():
    a, _ = collect(MEMORY)
    b, _ = collect(MEMORY)
    assert a == b
    assert McpMemoryImporter().detect(MEMORY)
    assert not McpMemoryImporter().detect(REPO / "pyproject.toml")


def test_wing_override_changes_ids():
    rows, _ = collect(MEMORY, wing="Old Memory")
    assert {d["wing"] for d in rows[DRAWERS]} == {"Old Memory"}
    assert all(d["id"].startswith("drawer_Old Memory_") for d in rows[DRAWERS])


def test_read_graph_shape(tmp_path):
    lines = [orjson.loads(l) for l in MEMORY.read_bytes().splitlines()]
    doc = {"entities": [{k: v for k, v in r.items() if k != "type"} for r in lines if r["type"] == "entity"],
           "relations": [{k: v for k, v in r.items() if k != "type"} for r in lines if r["type"] == "relation"]}
    p = tmp_path / "graph.json"
    p.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    assert McpMemoryImporter().detect(p)
    got, q = collect(p)
    want, _ = collect(MEMORY)
    assert q.count == 0
    def strip(rows):
        return sorted((d["id"], d["document"]) for d in rows)

    assert strip(got[DRAWERS]) == strip(want[DRAWERS])
    assert sorted(t["id"] for t in got[TRIPLES]) == sorted(t["id"] for t in want[TRIPLES])


def test_broken_lines_are_quarantined_with_file_and_line():
    rows, q = collect(BROKEN)
    # line 3 truncated JSON, 4 observations not a list, 5 not an object, 6 relation without "to",
    # 7 unknown type, 10 invalid UTF-8, 11 observation 1 is a number
    assert q.count == 7
    lines = sorted(int(m.split(":")[1]) for m in q.first)
    assert lines == [3, 4, 5, 6, 7, 10, 11]
    assert all(m.startswith(str(BROKEN)) for m in q.first)
    docs = sorted(d["document"] for d in rows[DRAWERS])
    assert docs == ["Alice (person): Leads the billing team", "Alice (person): Prefers small PRs",
                    "Dana (person): Joined in May"]
    assert [t["predicate"] for t in rows[TRIPLES]] == ["is_responsible_for"]


def test_empty_input_is_not_an_error(tmp_path):
    p = tmp_path / "memory.jsonl"
    p.write_text("")
    rows, q = collect(p)
    assert q.count == 0 and not any(rows.values())


def test_cli_import_broken_file_exits_3_and_keeps_the_rest(tmp_path):
    palace = tmp_path / "p"
    proc = run_cli("import", "mcp-memory", BROKEN, "--palace", palace, "--json", check=3)
    report = json.loads(proc.stdout)
    assert report["quarantined"] == 7 and report["drawers_written"] == 3
    qfile = Path(report["quarantine_file"])
    assert qfile.parent == palace / ".palace-etl" / "quarantine"
    recs = [json.loads(l) for l in qfile.read_text().splitlines()]
    assert [r["line"] for r in recs] == [3, 4, 5, 6, 7, 10, 11]
    assert recs[0]["raw"].startswith('{"type":"entity","name":"Bob"')
    assert len(palace_rows(palace)) == 3
    # Billing is a dangling relation target: created as an entity like MemPalace does
    assert {r[0] for r in kg_rows(palace / "knowledge_graph.sqlite3", "entities")} >= {"alice", "billing", "dana"}

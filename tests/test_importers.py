"""Every importer: the contract over the registry, the real corpus files with counts derived by
reading them, and the database sources built from their real DDL."""
from __future__ import annotations

import gzip
import json
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pytest

from importers.base import ImportOptions
from importers.quarantine import Quarantine
from importers.registry import CATALOGUE, choose, get_importer
from importers.schema import DRAWERS, TRIPLES, batch_kind, validate_batch

from .helpers import CORPUS, FIXTURES, REPO, cli_json, run_cli, run_python

SAMPLES = {  # one small realistic input per importer (sample_data/), and one with broken records
    "mcp-memory": ("mcp-memory/memory.jsonl", "../mcp-memory/broken.jsonl"),
    "mem0": ("mem0/mem0_get_all.json", "mem0.json"),
    "letta": ("letta/companion.af", "letta.af"),
    "zep": ("zep/graph_dump.json", "zep.json"),
    "mcp-memory-service": ("mcp-memory-service/memories_export.json", "mcp-memory-service.json"),
    "claude-code": ("claude-code/projects", "claude-code.jsonl"),
    "chatgpt": ("chatgpt/conversations.json", "chatgpt.json"),
    "claude-ai": ("claude-ai", "claude-ai.json"),
    "basic-memory": ("basic-memory", "basic-memory"),
    "claude-mem": ("claude-mem/claude-mem-export.json", "claude-mem.json"),
    "jsonl": ("jsonl/memories.jsonl", "jsonl.jsonl"),
    "csv": ("csv/memories.csv", "csv.csv"),
    "parquet": ("parquet/memories.parquet", "parquet.parquet"),
    "mempalace-jsonl": ("mempalace-jsonl", "mempalace-jsonl"),
    "palace": ("palace", None),  # a real MemPalace 3.11 palace; its broken case is made in a test
}


def read(name: str, path: Path) -> tuple[dict, Quarantine, list]:
    q = Quarantine()
    batches = list(get_importer(name).batches(Path(path), ImportOptions(), q))
    counts = {}
    for b in batches:
        counts[validate_batch(b)] = counts.get(batch_kind(b), 0) + b.num_rows
    return counts, q, batches


def test_every_registered_importer_has_a_sample_and_a_broken_fixture():
    assert set(SAMPLES) == set(CATALOGUE) and all(get_importer(n).name == n for n in CATALOGUE)
    for sample, broken in SAMPLES.values():
        assert (REPO / "sample_data" / sample).exists() and (broken is None or (FIXTURES / "broken" / broken).exists())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_contract_schema_determinism_and_auto_detection(name):
    path = REPO / "sample_data" / SAMPLES[name][0]
    counts, q, first = read(name, path)
    assert counts.get(DRAWERS, 0) > 0 and q.count == 0
    _, _, again = read(name, path)
    assert [b.to_pylist() for b in first] == [b.to_pylist() for b in again]  # deterministic
    assert choose(path) == name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_contract_empty_input_is_not_an_error(name, tmp_path):
    suffix = Path(SAMPLES[name][0]).suffix
    empty = tmp_path / ("empty" + suffix) if suffix else tmp_path / "empty"
    empty.mkdir() if not suffix else empty.write_bytes(b"")
    counts, q, _ = read(name, empty)
    assert counts.get(DRAWERS, 0) == 0 and q.count == 0


BROKEN = {  # records quarantined in tests/fixtures/broken, counted by reading each file
    "mcp-memory": None,  # covered in test_mcp_memory.py with its own fixture
    "mem0": (2, 2),  # no memory text; "last tuesday" is not a timestamp
    "letta": (1, 1),  # block-1 has no label and a non-string value
    "zep": (3, 1),  # e2 has no content; f1 ends before it starts; f2 names a missing node (f3: a triple only)
    "mcp-memory-service": (3, 1),  # empty content, a string record, "soon" as a timestamp
    "claude-code": (3, 1),  # "{not json", a bare array, "yesterday-ish"; x1/x2 is the good exchange
    "chatgpt": (1, 1),  # the second conversation's mapping is not an object
    "claude-ai": (2, 1),  # an object that is none of the three kinds, and a number
    "basic-memory": (2, 1),  # latin1.md is not UTF-8; bad-date.md's created is "sometime in spring"
    "claude-mem": (3, 1),  # observation 2 has no text at all, 3 says "yesterday", and a bare string
    "jsonl": (4, 1),  # line 2 is not JSON, line 3 has no text, line 4 ends before it starts, line 5 "last tuesday"
    "csv": (3, 1),  # c-2 has six fields, c-3 no text, c-4 "next week"
    "parquet": (2, 1),  # q-2 has no text, q-3 "the day after"
    "mempalace-jsonl": (3, 1),  # line 2 is cut off, line 3 has no id, line 4's metadata is a list
    "palace": None,  # test_palace_drawer_without_a_document_is_quarantined
}


@pytest.mark.parametrize("name", sorted(n for n in BROKEN if BROKEN[n]))
def test_contract_broken_records_are_quarantined_and_the_rest_imports(name, tmp_path):
    bad, good = BROKEN[name]
    path = FIXTURES / "broken" / SAMPLES[name][1]
    report = cli_json("import", name, path, "--palace", tmp_path / "p", check=3)
    assert report["quarantined"] == bad and report["drawers_written"] == good
    lines = Path(report["quarantine_file"]).read_text().splitlines()
    assert len(lines) == bad and all(Path(json.loads(x)["file"]).is_relative_to(path) for x in lines)


@pytest.mark.parametrize("name", sorted(n for n in SAMPLES if n != "mcp-memory"))
def test_contract_reimport_writes_nothing_and_verify_is_clean(name, tmp_path):
    path, palace = REPO / "sample_data" / SAMPLES[name][0], tmp_path / "p"
    first = cli_json("import", name, path, "--palace", palace)
    assert first["drawers_written"] == first["drawers_read"] > 0
    again = cli_json("import", name, path, "--palace", palace)
    assert again["drawers_written"] == 0 and again["kg_rows_written"] == 0
    assert again["drawers_unchanged"] == first["drawers_written"]
    run_cli("verify", "--palace", palace, "--against", name, path, "--probes", "20")


# Expected counts from reading each corpus file (see its SOURCES.md notes), not from the importer.
CORPUS_COUNTS = [
    # file, importer, drawers, triples, quarantined
    ("mem0/mem0_export.json", "mem0", 4, 0, 0),  # 4 records under "results"
    ("mem0/mem0_sample_export.json", "mem0", 5, 0, 0),  # 5 records
    # v1: 24 user messages, 5 of them heartbeat/login JSON -> 19 exchanges, plus persona + human blocks
    ("letta-agentfile/memgpt_agent_with_convo.v1.af", "letta", 21, 0, 0),
    ("letta-agentfile/memgpt_agent_with_convo.v2.af", "letta", 2, 0, 0),  # 2 blocks, 1 system message
    ("letta-agentfile/memgpt_agent.double_encoded.af", "letta", 2, 0, 0),  # same, two decodes
    ("mcp-memory-service/memory_export_template.json", "mcp-memory-service", 3, 0, 0),  # 3 memories
    ("zep-graphiti/sample_zep_dump.json", "zep", 6, 4, 0),  # 2 episodes + 4 fact texts; 4 edges
    ("claude-code/55550000-0000-4000-8000-000000000002.jsonl", "claude-code", 5, 0, 0),  # 5 user text turns
    # 11 lines: user text turns msg_001, _003, _007, _011 (the others are tool traffic) + a summary
    ("claude-code/representative_messages.jsonl", "claude-code", 4, 0, 0),
    # user text turns edge_001, _003, _006 and the second edge_011 line; edge_007/_008 hold only
    # slash-command and local-command tags, edge_005/_010 tool results. Quarantined: line 11 (a
    # string message), lines 13-16 (not records: a string, an object without type, 42, [1]).
    ("claude-code/edge_cases.jsonl", "claude-code", 4, 0, 5),
    # 4 files; MEMORY.md links 5 topic files, cursor-runs... links 1 -> 6 links_to triples
    ("claude-code-memory", "claude-code", 4, 6, 0),
    ("chatgpt/conversations.json", "chatgpt", 2, 0, 0),  # 1 user turn each; a branch is not a second turn
    ("chatgpt/chatgpt_export.json", "chatgpt", 3, 0, 0),  # 2 + 1 user turns
    ("claude-ai/conversations.json", "claude-ai", 1, 0, 0),  # 1 human message
    ("claude-ai/claude_export.json", "claude-ai", 5, 0, 0),  # 2 + 2 + 1 human messages
]


@pytest.mark.parametrize("rel, name, drawers, triples, bad", CORPUS_COUNTS)
def test_corpus_files_import_with_expected_counts(rel, name, drawers, triples, bad):
    counts, q, _ = read(name, CORPUS / rel)
    assert (counts.get(DRAWERS, 0), counts.get(TRIPLES, 0), q.count) == (drawers, triples, bad), q.first


def uncovered_corpus_files(corpus: Path, covered: set[str]) -> set[str]:
    """Corpus files no test imports; a missing or empty corpus is an error, never 'all covered'."""
    assert corpus.is_dir(), f"{corpus}: the corpus is missing"
    files = {str(p.relative_to(corpus)) for p in corpus.rglob("*") if p.is_file() and p.name != "SOURCES.md"}
    assert files, f"{corpus}: the corpus is empty"
    return {f for f in files if f not in covered and not any(f.startswith(c + "/") for c in covered)}


def test_every_corpus_file_is_covered():
    covered = {rel for rel, *_ in CORPUS_COUNTS} | {"mcp-memory/memory.jsonl"}  # test_mcp_memory.py
    assert uncovered_corpus_files(CORPUS, covered) == set()


def test_corpus_coverage_check_fails_on_a_missing_or_uncovered_corpus(tmp_path):
    """Planted defects for the check above: no corpus, an empty one, a file nobody tests."""
    with pytest.raises(AssertionError, match="missing"):
        uncovered_corpus_files(tmp_path / "nowhere", set())
    with pytest.raises(AssertionError, match="empty"):
        uncovered_corpus_files(tmp_path, set())
    (tmp_path / "mem0").mkdir()
    (tmp_path / "mem0" / "new.json").write_text("[]")
    assert uncovered_corpus_files(tmp_path, {"mem0/old.json"}) == {"mem0/new.json"}


def test_zep_validity_becomes_triple_validity(tmp_path):
    cli_json("import", "zep", REPO / "sample_data/zep/graph_dump.json", "--palace", tmp_path / "p")
    with sqlite3.connect(tmp_path / "p" / "knowledge_graph.sqlite3") as conn:
        rows = sorted(conn.execute("SELECT object, valid_from, valid_to FROM triples"))
    assert rows == [("nightly", "2026-04-10T15:00:00+00:00", None),
                    ("hourly", "2026-03-02T09:00:00+00:00", "2026-04-10T15:00:00+00:00")][::-1]


def test_mem0_history_db_rebuilds_current_memories(tmp_path):
    db = tmp_path / "history.db"
    with sqlite3.connect(db) as conn:  # mem0/memory/storage.py's DDL
        conn.execute("CREATE TABLE history (id TEXT PRIMARY KEY, memory_id TEXT, old_memory TEXT, new_memory TEXT, "
                     "event TEXT, created_at DATETIME, updated_at DATETIME, is_deleted INTEGER, actor_id TEXT, "
                     "role TEXT)")
        conn.executemany("INSERT INTO history VALUES (?,?,?,?,?,?,?,?,?,?)", [
            ("h1", "m1", None, "Likes jazz", "ADD", "2026-01-01T00:00:00", None, 0, None, "user"),
            ("h2", "m1", "Likes jazz", "Likes jazz and blues", "UPDATE", "2026-01-01T00:00:00", "2026-02-01T00:00:00",
             0, None, "user"),
            ("h3", "m2", None, "Lives in Oslo", "ADD", "2026-01-03T00:00:00", None, 0, None, "user"),
            ("h4", "m2", "Lives in Oslo", None, "DELETE", "2026-01-03T00:00:00", "2026-03-01T00:00:00", 1, None, None),
            ("h5", "m3", None, "Has two kids", "ADD", "2026-01-04T00:00:00", None, 0, None, "user")])
    assert choose(db) == "mem0"
    r = cli_json("import", "mem0", db, "--palace", tmp_path / "p")
    assert r["drawers_written"] == 2 and r["skipped"] == {"deleted memories": 1}
    docs = sorted(run_docs(tmp_path / "p"))
    assert docs == ["Has two kids", "Likes jazz and blues"]


def test_openmemory_export_zip(tmp_path):
    z = tmp_path / "memories_export_dana.zip"
    lines = [{"id": "a", "content": "Prefers dark roast", "state": "active", "app": "cursor", "categories": ["food"],
              "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"},
             {"id": "b", "content": "Old address", "state": "deleted", "app": "cursor", "categories": []}]
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("memories.jsonl.gz", gzip.compress("\n".join(json.dumps(x) for x in lines).encode()))
        zf.writestr("memories.json", json.dumps({"memories": [], "apps": []}))
    assert choose(z) == "mem0"
    counts, q, batches = read("mem0", z)
    assert counts[DRAWERS] == 1 and q.skipped == {"deleted memories": 1}
    assert batches[0].to_pylist()[0]["room"] == "food"


def run_docs(palace: Path) -> list[str]:
    from palace.layout import layout_for
    from palace.vectors import VectorStore

    store = VectorStore(layout_for(palace))
    try:
        return [d for _, _, d, _ in store.scan(("documents",))]
    finally:
        store.close()


def test_mcp_memory_service_database_carries_its_vectors(tmp_path, embedder):
    """A real sqlite_vec.db (the service's DDL, a real vec0 table made by the sqlite-vec extension
    through apsw); the importer reads vec0's storage without the extension."""
    apsw = pytest.importorskip("apsw")
    sqlite_vec = pytest.importorskip("sqlite_vec")
    db = tmp_path / "sqlite_vec.db"
    texts = ["Deploys happen on Thursdays", "The API key rotates monthly", "Old note, deleted", "Chunk one. ",
             "Chunk two."]
    conn = apsw.Connection(str(db))
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    conn.execute("""CREATE TABLE memories (id INTEGER PRIMARY KEY AUTOINCREMENT, content_hash TEXT UNIQUE NOT NULL,
        content TEXT NOT NULL, tags TEXT, memory_type TEXT, metadata TEXT, created_at REAL, updated_at REAL,
        created_at_iso TEXT, updated_at_iso TEXT, deleted_at REAL DEFAULT NULL)""")
    conn.execute("CREATE VIRTUAL TABLE memory_embeddings USING vec0(content_embedding FLOAT[384] distance_metric=cosine)")
    conn.execute("""CREATE TABLE memory_graph (source_hash TEXT, target_hash TEXT, similarity REAL,
        connection_types TEXT, metadata TEXT, created_at REAL, relationship_type TEXT DEFAULT 'related',
        PRIMARY KEY (source_hash, target_hash))""")
    vecs = embedder.embed(texts)
    metas = [{"project": "ops"}, {}, {}, {"chunk_index": 0, "original_hash": "whole"},
             {"chunk_index": 1, "original_hash": "whole"}]
    for i, (t, v, m) in enumerate(zip(texts, vecs, metas), 1):
        conn.execute("INSERT INTO memories (id, content_hash, content, tags, memory_type, metadata, created_at, "
                     "updated_at, deleted_at) VALUES (?,?,?,?,?,?,?,?,?)",
                     (i, f"hash{i}", t, "ops,deploy", "note", json.dumps(m), 1767225600.0 + i, 1767225600.0 + i,
                      1767225700.0 if i == 3 else None))
        conn.execute("INSERT INTO memory_embeddings(rowid, content_embedding) VALUES (?, ?)",
                     (i, sqlite_vec.serialize_float32(v.tolist())))
    conn.execute("INSERT INTO memory_graph (source_hash, target_hash, relationship_type) VALUES "
                 "('hash1', 'hash2', 'related')")
    conn.close()
    assert choose(db) == "mcp-memory-service"
    counts, q, batches = read("mcp-memory-service", db)
    carried = [r for b in batches if "embedding" in b.schema.names for r in b.to_pylist()]
    assert {r["document"] for r in carried} == set(texts[:2])
    for r in carried:
        want = vecs[texts.index(r["document"])]
        assert float(np.dot(np.asarray(r["embedding"]), want)) > 0.99999
    assert q.skipped == {"soft-deleted memories": 1} and counts[TRIPLES] == 1
    r = cli_json("import", "mcp-memory-service", db, "--palace", tmp_path / "p")
    assert r["vectors_carried"] == 2 and r["vectors_embedded"] == 1  # the reassembled chunks are re-embedded
    assert "Chunk one. Chunk two." in run_docs(tmp_path / "p")


def test_import_auto_reports_its_choice_and_stops_when_unsure(tmp_path):
    proc = run_cli("import", "auto", REPO / "sample_data/zep/graph_dump.json", "--palace", tmp_path / "p",
                   "--dry-run")
    assert "looks like zep" in proc.stderr
    odd = tmp_path / "notes.txt"
    odd.write_text("just some text\n")
    assert "no importer recognises" in run_cli("import", "auto", odd, "--palace", tmp_path / "p", check=1).stderr


def test_claude_ai_split_export_single_object_memory_file(tmp_path):
    """Newer exports put each memory in memories/<uuid>.json as one object, with memory_files."""
    (tmp_path / "memories").mkdir()
    (tmp_path / "memories" / "0198.json").write_text(json.dumps({
        "conversations_memory": "**Work context**\n\nAlex is a backend engineer.",
        "project_memories": {"p-1": "Project uses Postgres 16"},
        "memory_files": [{"path": "/profile.md", "content": "- Prefers metric units", "updated_at": "2026-01-02T03:04:05Z"}],
        "account_uuid": "acct-1"}))
    assert choose(tmp_path) == "claude-ai"
    counts, q, batches = read("claude-ai", tmp_path)
    rooms = sorted(r["room"] for b in batches for r in b.to_pylist())
    assert rooms == ["claude_memory", "memory_files", "project_memory"] and q.count == 0


def test_basic_memory_observations_and_relations_become_triples():
    """Counted by reading sample_data/basic-memory: per note, observations (task markers, [00:01]
    and headings aside) + relation lines + other [[links]]."""
    counts, q, batches = read("basic-memory", REPO / "sample_data/basic-memory")
    # ada 4 obs + 3 rel; babbage 3 + 3; engine 3 + 2 + 2 links; reading list 1 + 2 links; index 3 links
    assert (counts[DRAWERS], counts[TRIPLES], q.count) == (5, 26, 0)
    triples = {(r["subject"], r["predicate"], r["object"]) for b in batches if batch_kind(b) == TRIPLES
               for r in b.to_pylist()}
    assert ("Ada Lovelace", "has_fact", "Wrote the first published program for the Analytical Engine") in triples
    assert ("Ada Lovelace", "has_name", "Augusta Ada King") in triples  # "(her married name)" is context
    assert ("Ada Lovelace", "wrote_notes_on", "Analytical Engine") in triples
    assert ("Reading list", "links_to", "Difference Engine") in triples
    assert not any(p in ("has_x", "has_", "has_00:01") or o.startswith("Swade") for _, p, o in triples)
    rooms = {r["id"]: (r["room"], r["extra"]) for b in batches if batch_kind(b) == DRAWERS for r in b.to_pylist()}
    assert sorted(room for room, _ in rooms.values()) == ["index", "notes", "people", "people", "projects"]


CLAUDE_MEM_DDL = [  # the columns claude-mem's src/services/sqlite/schema.sql declares (migration 35)
    """CREATE TABLE sdk_sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, content_session_id TEXT UNIQUE NOT NULL,
       memory_session_id TEXT UNIQUE, project TEXT NOT NULL, platform_source TEXT NOT NULL DEFAULT 'claude',
       user_prompt TEXT, started_at TEXT NOT NULL, started_at_epoch INTEGER NOT NULL, completed_at TEXT,
       completed_at_epoch INTEGER, status TEXT NOT NULL DEFAULT 'active', worker_port INTEGER,
       prompt_counter INTEGER DEFAULT 0, custom_title TEXT)""",
    """CREATE TABLE observations (id INTEGER PRIMARY KEY AUTOINCREMENT, memory_session_id TEXT NOT NULL,
       project TEXT NOT NULL, text TEXT, type TEXT NOT NULL, title TEXT, subtitle TEXT, facts TEXT, narrative TEXT,
       concepts TEXT, files_read TEXT, files_modified TEXT, prompt_number INTEGER, discovery_tokens INTEGER DEFAULT 0,
       content_hash TEXT, agent_type TEXT, agent_id TEXT, merged_into_project TEXT, generated_by_model TEXT,
       metadata TEXT, created_at TEXT NOT NULL, created_at_epoch INTEGER NOT NULL,
       UNIQUE(memory_session_id, content_hash))""",
    """CREATE TABLE session_summaries (id INTEGER PRIMARY KEY AUTOINCREMENT, memory_session_id TEXT NOT NULL,
       project TEXT NOT NULL, request TEXT, investigated TEXT, learned TEXT, completed TEXT, next_steps TEXT,
       files_read TEXT, files_edited TEXT, notes TEXT, prompt_number INTEGER, discovery_tokens INTEGER DEFAULT 0,
       merged_into_project TEXT, created_at TEXT NOT NULL, created_at_epoch INTEGER NOT NULL)""",
    """CREATE TABLE user_prompts (id INTEGER PRIMARY KEY AUTOINCREMENT, content_session_id TEXT NOT NULL,
       prompt_number INTEGER NOT NULL, prompt_text TEXT NOT NULL, created_at TEXT NOT NULL,
       created_at_epoch INTEGER NOT NULL)""",
    """CREATE TABLE directives (id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT NOT NULL DEFAULT 'global',
       project TEXT, content TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'active', source TEXT NOT NULL DEFAULT
       'manual', created_at TEXT NOT NULL, created_at_epoch INTEGER NOT NULL, updated_at_epoch INTEGER NOT NULL)""",
]


def test_claude_mem_database(tmp_path):
    db = tmp_path / "claude-mem.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # as claude-mem runs it
        for ddl in CLAUDE_MEM_DDL:
            conn.execute(ddl)
        conn.execute("INSERT INTO sdk_sessions (content_session_id, memory_session_id, project, started_at, "
                     "started_at_epoch) VALUES ('c1', 's1', 'app', '2026-01-01T00:00:00Z', 1767225600000)")
        conn.executemany("INSERT INTO observations (memory_session_id, project, type, title, subtitle, facts, "
                         "narrative, concepts, files_modified, created_at, created_at_epoch) VALUES "
                         "(?,?,?,?,?,?,?,?,?,?,?)", [
                             ("s1", "app", "bugfix", "Null check in parser", "Crash on empty input",
                              '["parse(\\"\\") threw"]', "Guarded the empty case.", '["parser"]', '["src/parse.ts"]',
                              "2026-01-01T00:01:00Z", 1767225660000),
                             ("s1", "app", "decision", "Keep JSON config", None, None, "YAML adds a dependency.",
                              None, None, "2026-01-01T00:02:00Z", 1767225720000)])
        conn.execute("INSERT INTO session_summaries (memory_session_id, project, request, learned, created_at, "
                     "created_at_epoch) VALUES ('s1', 'app', 'Fix the parser', 'Empty input was never tested', "
                     "'2026-01-01T00:03:00Z', 1767225780000)")
        conn.executemany("INSERT INTO directives (project, content, status, created_at, created_at_epoch, "
                         "updated_at_epoch) VALUES (?,?,?,?,?,?)",
                         [("app", "Never commit .env files", "active", "x", 1767225600000, 1767225600000),
                          ("app", "Use tabs", "retired", "x", 1767225600000, 1767225600000)])
        conn.execute("INSERT INTO user_prompts (content_session_id, prompt_number, prompt_text, created_at, "
                     "created_at_epoch) VALUES ('c1', 1, 'fix the parser', 'x', 1767225600000)")
    assert choose(db) == "claude-mem"
    counts, q, batches = read("claude-mem", db)
    drawers = {r["room"]: r for b in batches if batch_kind(b) == DRAWERS for r in b.to_pylist()}
    assert sorted(drawers) == ["bugfix", "decision", "directives", "session-summary"] and counts[TRIPLES] == 2
    assert drawers["bugfix"]["document"] == ('Null check in parser\nCrash on empty input\n\nGuarded the empty case.'
                                             '\n\n- parse("") threw')
    assert drawers["bugfix"]["created_at"].isoformat() == "2026-01-01T00:01:00+00:00"
    assert q.skipped == {"claude-mem sessions (not memories)": 1, "claude-mem prompts (not memories)": 1,
                         "claude-mem directives that are not active": 1}
    r = cli_json("import", "claude-mem", db, "--palace", tmp_path / "p")
    assert r["drawers_written"] == 4 and r["per_room"] == {"app": {"bugfix": 1, "decision": 1, "directives": 1,
                                                                  "session-summary": 1}}


def test_a_bad_timestamp_names_the_text_it_got():
    from importers.base import to_utc

    with pytest.raises(ValueError, match="'next week' is not a timestamp"):
        to_utc("next week")
    assert to_utc("1765410000000").isoformat() == "2025-12-10T23:40:00+00:00"  # epoch ms as text


@pytest.mark.parametrize("name,suffix", [("jsonl", ".jsonl"), ("mcp-memory", ".jsonl"), ("claude-code", ".jsonl"),
                                         ("csv", ".csv")])
def test_a_line_longer_than_any_record_is_quarantined_without_being_held(name, suffix, tmp_path):
    """A 200 MiB line (no newline in it: a corrupt or hostile file) between good records: the import
    never holds it whole, so its peak memory stays far below the line's size; the line is quarantined
    by number and the records around it come in (for CSV, whose quoted fields may span lines, the
    rest of the file is unreadable from there)."""
    src = tmp_path / f"source{suffix}"
    first, last = {
        "jsonl": (b'{"id": "a", "text": "the first memory"}', b'{"id": "b", "text": "the last memory"}'),
        "mcp-memory": (b'{"type": "entity", "name": "Ann", "entityType": "person", "observations": ["likes tea"]}',
                       b'{"type": "entity", "name": "Bob", "entityType": "person", "observations": ["likes rain"]}'),
        "claude-code": tuple(json.dumps({"type": "user", "uuid": u, "parentUuid": up, "sessionId": "s",
                                         "timestamp": f"2026-01-01T00:00:0{k}Z",
                                         "message": {"role": "user", "content": f"question number {k}"}}).encode()
                             for k, (u, up) in enumerate([("u1", None), ("u2", "u1")])),
        "csv": (b"id,text\na,the first memory", b"b,the last memory"),
    }[name]
    with open(src, "wb") as f:
        f.write(first + b"\n")
        for _ in range(200):
            f.write(b"x" * (1 << 20))
        f.write(b"\n" + last + b"\n")
    long_line = 3 if name == "csv" else 2
    try:
        r = run_python(  # the import alone in a child, so its own peak memory is what getrusage reports
            "import resource, subprocess, sys\n"
            f"p = subprocess.run([sys.executable, '-m', 'etl.cli', 'import', {name!r}, {str(src)!r}, '--palace', "
            f"{str(tmp_path / 'p')!r}, '--json'], capture_output=True, text=True)\n"
            "emit({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:],"
            " 'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})\n", timeout=600)
    finally:
        src.unlink()  # 200 MiB: not kept with pytest's last runs
    assert r["rc"] == 3, r["err"]
    report = json.loads(r["out"])
    assert report["quarantined"] == 1
    assert report["quarantine_first"][0].startswith(f"{src}:{long_line}: ")
    assert "a line longer than 64 MiB" in report["quarantine_first"][0]
    assert report["drawers_written"] >= 1 and report["drawers_read"] == (1 if name == "csv" else 2)
    assert r["peak_mb"] < 800, r["peak_mb"]  # holding the line took 1.1 GB here; reading past it, 0.43 GB

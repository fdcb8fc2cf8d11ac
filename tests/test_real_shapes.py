"""Importers meet the shapes real tools write (issue 19). Each fixture in fixtures/real-shapes/ is our
own small file with one shape seen in a real export."""
from __future__ import annotations

import sqlite3

from importers.registry import detect

from .helpers import FIXTURES, cli_json, palace_rows

SHAPES = FIXTURES / "real-shapes"


def import_json(name: str, src, palace, *extra):
    return cli_json("import", name, src, "--palace", palace, *extra)


# ------------------------------------------------------------------ MCP memory
def test_mcp_memory_servers_without_type_with__type_timestamps_extras_nested_relations_and_a_title(tmp_path):
    src = SHAPES / "mcp-memory-variants.jsonl"
    r = import_json("mcp-memory", src, tmp_path / "p")
    assert (r["drawers_written"], r["quarantined"], r["skipped"]) == (2, 0, {"header text lines": 1})
    rows = {v["metadata"]["entities"]: v["metadata"] for v in palace_rows(tmp_path / "p").values()}
    dana = rows["Dana"]
    assert dana["created_at"] == "2026-03-01T10:00:00+00:00" and dana["updated_at"] == "2026-03-02T10:00:00+00:00"
    assert dana["version"] == 3 and dana["createdBy"] == "claude"
    with sqlite3.connect(tmp_path / "p" / "knowledge_graph.sqlite3") as c:
        triples = sorted(c.execute("SELECT subject, predicate, object FROM triples"))
    assert triples == [("dana", "owns", "palace"), ("palace", "maintained_by", "dana"),  # entity ids
                       ("palace", "stores_vectors_in", "chroma")]


def test_mcp_memory_lines_without_type_are_entities_and_relations(tmp_path):
    r = import_json("mcp-memory", SHAPES / "mcp-memory-untyped.jsonl", tmp_path / "p")
    assert (r["drawers_written"], r["triples_read"], r["quarantined"]) == (1, 1, 0)


def test_import_auto_recognises_every_mcp_memory_variant():
    for f in ("mcp-memory-variants.jsonl", "mcp-memory-untyped.jsonl"):
        assert detect(SHAPES / f) == ["mcp-memory"], f


def documents(palace) -> list[str]:
    return sorted(v["document"] for v in palace_rows(palace).values())


# ------------------------------------------------------------------ ChatGPT
def test_chatgpt_current_node_inside_the_thread_and_a_conversation_without_mapping(tmp_path):
    r = import_json("chatgpt", SHAPES / "chatgpt-conversations.json", tmp_path / "p")
    assert r["quarantined"] == 0 and r["skipped"]["conversations without a mapping tree (empty)"] == 1
    assert documents(tmp_path / "p") == ["> And how often?\nNightly at 03:30.",
                                         "> Where do backups go?\nTo the shared disk."]


# ------------------------------------------------------------------ Claude.ai
def test_claude_ai_projects_instructions_and_docs_are_memories_and_empty_projects_are_skipped(tmp_path):
    r = import_json("claude-ai", SHAPES / "claude-ai-projects.json", tmp_path / "p")
    assert r["per_room"] == {"claude_ai": {"project_instructions": 1, "project_docs": 1}}
    assert r["skipped"] == {"empty projects (no name, no instructions, no documents)": 1} and r["quarantined"] == 0
    assert "Answer as the homelab's runbook." in documents(tmp_path / "p")


def test_claude_ai_conversation_follows_the_branch_of_the_latest_leaf(tmp_path):
    import_json("claude-ai", SHAPES / "claude-ai-branching.json", tmp_path / "p")
    docs = documents(tmp_path / "p")
    assert docs == ["> Good, go on\nStep two", "> Plan the migration\nRetried answer, from its blocks"]
    assert not any("First draft" in d for d in docs)  # the abandoned branch


def test_import_auto_recognises_the_chat_export_shapes():
    assert detect(SHAPES / "chatgpt-conversations.json") == ["chatgpt"]
    assert detect(SHAPES / "claude-ai-projects.json") == ["claude-ai"]
    assert detect(SHAPES / "claude-ai-branching.json") == ["claude-ai"]


# ------------------------------------------------------------------ Basic Memory
def test_basic_memory_code_fences_numbered_observations_no_frontmatter_and_comma_tags(tmp_path):
    r = import_json("basic-memory", SHAPES / "basic-memory", tmp_path / "p")
    assert r["drawers_written"] == 2 and r["quarantined"] == 0  # the note without frontmatter is a note
    with sqlite3.connect(tmp_path / "p" / "knowledge_graph.sqlite3") as c:
        triples = sorted(c.execute("SELECT subject, predicate, object FROM triples"))
    objects = {o for _, _, o in triples}
    assert {p for _, p, _ in triples} == {"has_principle", "has_schedule", "has_tool", "depends_on", "links_to"}
    assert not objects & {"not_a_real_note", "also_not_real", "this line is documentation"}  # fenced examples
    assert ("plain", "links_to", "backups") in triples  # titled by its file stem
    tags = {v["metadata"].get("tags") for v in palace_rows(tmp_path / "p").values()}
    assert "ops;nightly;restic" in tags


# ------------------------------------------------------------------ Letta
def test_letta_harness_text_is_skipped_messaging_tools_reply_and_same_label_blocks_are_kept(tmp_path):
    r = import_json("letta", SHAPES / "letta-harness.af", tmp_path / "p")
    assert r["quarantined"] == 0
    assert r["skipped"]["system-reminder harness messages"] == 1
    assert r["skipped"]["sleeptime agent transcripts"] == 1
    assert r["skipped"]["heartbeats and system events"] == 1
    docs = documents(tmp_path / "p")
    assert "> Remember: backups run nightly.\nI will remember that the backups run nightly." in docs
    assert "> What time is it in Tokyo?\nAsking the clock agent for you." in docs  # reminder stripped, tool reply
    assert not any("sleeptime agent" in d or "has not said anything" in d for d in docs)
    personas = [d for d in docs if d.startswith("I ")]
    assert sorted(personas) == ["I am a helpful companion.", "I consolidate memories while the main agent rests."]
    rooms = set(r["per_room"]["companion"])
    assert rooms == {"persona", "memory_notes", "conversations"}, rooms
    assert detect(SHAPES / "letta-harness.af") == ["letta"]


# ------------------------------------------------------------------ Claude Code
def test_claude_code_transcript_follows_the_visible_branch_across_compaction(tmp_path):
    r = import_json("claude-code", SHAPES / "claude-code-branches.jsonl", tmp_path / "p")
    assert r["quarantined"] == 0
    assert documents(tmp_path / "p") == [
        "> After the compaction, one more thing\nOK, done.",  # across the boundary; ANSI codes stripped
        "> Explain the result\nPart one.\nPart two.",  # streamed lines of one message: one reply, no repeat
        "> Hello, let us plan the migration\nSure, where is the palace?",
        "> Run both checks\nBoth checks passed",  # parallel tool calls forked the chain: nothing lost
        "> Second try at the question\nThe answer that stayed",  # the rewound try is gone
    ]
    assert r["skipped"]["messages off the visible branch (rewound or forked)"] == 3  # u1, a1 and a tool result
    assert r["skipped"]["compaction summaries"] == 1 and r["skipped"]["progress records"] == 1


def test_import_auto_recognises_a_transcript_that_opens_with_snapshots_and_summaries(tmp_path):
    assert detect(SHAPES / "claude-code-branches.jsonl") == ["claude-code"]
    lines = (SHAPES / "claude-code-branches.jsonl").read_text().splitlines()
    progress_first = tmp_path / "t.jsonl"
    progress_first.write_text("\n".join([lines[-1], *lines[:-1]]) + "\n")  # a progress record first
    assert detect(progress_first) == ["claude-code"]


def test_import_auto_recognises_the_basic_memory_folder_with_a_note_without_frontmatter():
    assert detect(SHAPES / "basic-memory") == ["basic-memory"]

"""The palaces we write are real MemPalace palaces: mempalace 3.11 opens, lists and searches them,
on every backend we write -- a Chroma directory and a pgvector palace on a real PostgreSQL.

Everything runs in subprocesses against the installed ``mempalace[pgvector]==3.11.0`` (the test
extra), with the isolated HOME whose model our ``model install`` provisioned, and for pgvector with
MemPalace's own settings (``MEMPALACE_BACKEND``, ``MEMPALACE_PGVECTOR_DSN``) in the environment.
"""
import subprocess

import pytest

from .helpers import BIN, CORPUS, cli_json, run_python

MEMORY = CORPUS / "mcp-memory" / "memory.jsonl"


@pytest.fixture(scope="module", params=["chroma", "pgvector"])
def palace(request, tmp_path_factory):
    p = tmp_path_factory.mktemp("compat") / "palace"
    with pytest.MonkeyPatch.context() as env:
        if request.param == "pgvector":
            env.setenv("MEMPALACE_BACKEND", "pgvector")
            env.setenv("MEMPALACE_PGVECTOR_DSN", request.getfixturevalue("postgres"))
        cli_json("import", "mcp-memory", MEMORY, "--palace", p)
        assert (p / ("pgvector_backend.json" if request.param == "pgvector" else "chroma.sqlite3")).is_file()
        yield p


def palace_rows(palace) -> dict[str, dict]:
    """{id: {document, metadata}} of every drawer, read by MemPalace's own reader (any backend)."""
    return run_python(f"""
from mempalace.palace import get_collection
got = get_collection({str(palace)!r}, create=False, read_only=True).get(include=["documents", "metadatas"])
emit({{i: {{"document": d, "metadata": m}} for i, d, m in zip(got["ids"], got["documents"], got["metadatas"])}})
""")


def mempalace(*args, timeout=180):
    proc = subprocess.run([str(BIN / "mempalace"), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_mempalace_status_lists_wings_and_rooms(palace):
    out = mempalace("--palace", palace, "status")
    assert "47 drawers" in out
    assert "WING: mcp_memory" in out
    for room, n in {"project": 13, "tracker": 10, "dependency": 7, "technology": 6}.items():
        assert f"ROOM: {room}" in out and f"{n} drawers" in out


def test_mcp_read_tools(palace):
    rows = palace_rows(palace)
    target = next(i for i, r in rows.items() if r["document"].startswith("D3.js (library):"))
    got = run_python(f"""
import json
import mempalace.mcp_server as m
m._apply_server_flags(palace={str(palace)!r})
listed = m.tool_list_drawers(wing="mcp_memory", limit=100)
emit({{
    "status": m.tool_status(), "wings": m.tool_list_wings(), "listed": listed,
    "drawer": m.tool_get_drawer({target!r}), "kg": m.tool_kg_query("D3.js"),
}})
""")
    assert got["status"]["total_drawers"] == 47
    assert got["status"]["rooms"]["project"] == 13
    assert got["wings"] == {"wings": {"mcp_memory": 47}}
    assert {d["drawer_id"] for d in got["listed"]["drawers"]} == set(rows)
    drawer = got["drawer"]
    assert drawer["content"] == rows[target]["document"]
    assert (drawer["wing"], drawer["room"]) == ("mcp_memory", "library")
    facts = {(f["subject"], f["predicate"], f["object"]) for f in got["kg"]["active_facts"]}
    assert ("D3.js", "created_by", "Mike Bostock") in facts
    assert ("server-memory-editor", "uses", "D3.js") in facts


def test_mempalace_vector_search_finds_the_drawer_first(palace):
    rows = palace_rows(palace)
    text = next(r["document"] for r in rows.values() if r["document"].startswith("D3.js (library): Поддерживает"))
    out = mempalace("--palace", palace, "search", text, "--results", "3")
    first = out.split("[1]", 1)[1].split("[2]", 1)[0]
    assert text in first and "cosine_sim=1.0 " in first


def test_mempalace_repair_status_sees_no_divergence(palace):
    if not (palace / "chroma.sqlite3").exists():
        pytest.skip("repair-status compares Chroma's SQLite with its HNSW index; a pgvector palace has neither")
    out = mempalace("--palace", palace, "repair-status")
    assert "DIVERGED" not in out

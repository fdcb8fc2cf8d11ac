"""The generic table importers (column mapping, vector columns), MemPalace's JSONL export shape
(round trip through our own export) and another palace as a source (read-only, vectors carried)."""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from importers.registry import choose, detect

from .helpers import REPO, cli_json, palace_rows, run_cli

SAMPLE_PALACE = REPO / "sample_data" / "palace"


def test_csv_column_mapping_comes_from_flags_and_verify_reuses_it(tmp_path):
    src = tmp_path / "notes.csv"
    src.write_text("key,body,project,kind,when\nk1,First note body,alpha,ideas,2025-05-01T10:00:00Z\n"
                   "k2,Second note body,beta,todo,1746093600\n")
    palace = tmp_path / "p"
    assert "csv" not in detect(src)  # no text column: only the mapping says which column is the text
    r = cli_json("import", "csv", src, "--palace", palace, "--map", "text=body", "--map", "id=key",
                 "--map", "wing=project", "--map", "room=kind", "--map", "created_at=when")
    assert r["per_room"] == {"alpha": {"ideas": 1}, "beta": {"todo": 1}} and r["quarantined"] == 0
    rows = palace_rows(palace)
    assert sorted(v["metadata"]["origin_id"] for v in rows.values()) == ["k1", "k2"]
    assert {v["metadata"]["created_at"] for v in rows.values()} == {"2025-05-01T10:00:00+00:00"}  # ISO = epoch
    run_cli("verify", "--palace", palace, "--against", "csv", src, "--probes", "2")  # the ledger kept --map
    # no text column: every row is unreadable, so it is not a csv of memories as given: said, nothing created
    unmapped = run_cli("import", "csv", src, "--palace", tmp_path / "q", check=1)
    assert "notes.csv:2: no text in column 'text'" in unmapped.stderr and not (tmp_path / "q").exists()


def test_unknown_mapping_field_is_a_usage_error(tmp_path):
    proc = run_cli("import", "jsonl", REPO / "sample_data/jsonl/memories.jsonl", "--palace", tmp_path / "p",
                   "--map", "body=text", check=1)
    assert "unknown field body" in proc.stderr and not (tmp_path / "p" / "chroma.sqlite3").exists()
    proc = run_cli("import", "jsonl", REPO / "sample_data/jsonl/memories.jsonl", "--palace", tmp_path / "p",
                   "--map", "text", check=2)
    assert "FIELD=COLUMN" in proc.stderr


def test_parquet_vector_column_is_carried_when_declared(tmp_path, embedder):
    texts = ["Backups run at 02:00", "The VPN needs the hardware key", "Lunch is at noon on Fridays"]
    vecs = embedder.embed(texts)
    src = tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"id": ["v1", "v2", "v3"], "text": texts,
                             "vec": pa.array([v.tolist() for v in vecs], pa.list_(pa.float32()))}), src)
    r = cli_json("import", "parquet", src, "--palace", tmp_path / "p", "--map", "embedding=vec",
                 "--vector-model", "minilm", "--vector-dim", "384")
    assert (r["vectors_carried"], r["vectors_embedded"]) == (3, 0) and r["vector_decision"].startswith("carry")
    stored = palace_rows(tmp_path / "p", vectors=True)
    for row in stored.values():
        want = vecs[texts.index(row["document"])]
        assert sum(a * b for a, b in zip(row["embedding"], want)) > 0.99999
    # undeclared: the vectors are not trusted, the rows are embedded and the skip is reported
    r = cli_json("import", "parquet", src, "--palace", tmp_path / "q", "--map", "embedding=vec")
    assert r["vectors_embedded"] == 3 and list(r["skipped"].values()) == [3]
    # declared with the wrong dimension: every row is unreadable, the run says why and creates nothing
    proc = run_cli("import", "parquet", src, "--palace", tmp_path / "s", "--map", "embedding=vec",
                   "--vector-model", "minilm", "--vector-dim", "768", check=1)
    assert "3 unreadable record(s)" in proc.stderr and not (tmp_path / "s").exists()
    # another model's vectors are re-embedded, and the run says so
    r = cli_json("import", "parquet", src, "--palace", tmp_path / "t", "--map", "embedding=vec",
                 "--vector-model", "bge-small", "--vector-dim", "384")
    assert r["vectors_embedded"] == 3 and "re-embed" in r["vector_decision"]


def test_corrupt_parquet_is_quarantined_with_its_name(tmp_path):
    src = tmp_path / "broken.parquet"
    src.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    proc = run_cli("import", "parquet", src, "--palace", tmp_path / "p", check=1)
    assert f"{src}: unreadable Parquet" in proc.stderr and not (tmp_path / "p").exists()


def test_mempalace_jsonl_round_trips_our_own_export(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "export"
    cli_json("import", "mem0", REPO / "sample_data/mem0/mem0_get_all.json", "--palace", a)
    run_cli("export", "--palace", a, "--out", out, "--format", "jsonl")
    assert choose(out) == "mempalace-jsonl"
    r = cli_json("import", "mempalace-jsonl", out, "--palace", b)
    assert r["quarantined"] == 0
    rows_a, rows_b = palace_rows(a), palace_rows(b)
    assert rows_a.keys() == rows_b.keys()
    for i, row in rows_a.items():
        ma, mb = row["metadata"], rows_b[i]["metadata"]
        assert row["document"] == rows_b[i]["document"]
        assert all(ma[k] == mb[k] for k in ("wing", "room", "source_file", "filed_at", "created_at", "chunk_index"))
    run_cli("verify", "--palace", b, "--against", "mempalace-jsonl", out, "--probes", "5")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def test_palace_merge_carries_vectors_keeps_ids_and_leaves_the_source_alone(tmp_path):
    target = tmp_path / "merged"
    cli_json("import", "zep", REPO / "sample_data/zep/graph_dump.json", "--palace", target)
    before = _digest(SAMPLE_PALACE)
    r = cli_json("import", "palace", SAMPLE_PALACE, "--palace", target)
    assert _digest(SAMPLE_PALACE) == before  # never opened by Chroma, never written
    assert (r["drawers_written"], r["vectors_carried"], r["vectors_embedded"]) == (7, 7, 0)
    shutil.copytree(SAMPLE_PALACE, tmp_path / "copy")  # a Chroma client writes: read a copy
    src = palace_rows(tmp_path / "copy", vectors=True)
    merged = palace_rows(target, vectors=True)
    assert src.keys() <= merged.keys()
    for i, row in src.items():
        assert merged[i]["document"] == row["document"]
        assert merged[i]["metadata"]["filed_at"] == row["metadata"]["filed_at"]
        assert sum(a * b for a, b in zip(merged[i]["embedding"], row["embedding"])) > 0.99999
    with sqlite3.connect(SAMPLE_PALACE / "knowledge_graph.sqlite3") as c:
        want = set(c.execute("SELECT id, subject, predicate, object, valid_from, valid_to FROM triples"))
    with sqlite3.connect(target / "knowledge_graph.sqlite3") as c:
        got = set(c.execute("SELECT id, subject, predicate, object, valid_from, valid_to FROM triples"))
    assert want <= got
    again = cli_json("import", "palace", SAMPLE_PALACE, "--palace", target)
    assert again["drawers_written"] == 0 and again["kg_rows_written"] == 0
    run_cli("verify", "--palace", target, "--against", "palace", SAMPLE_PALACE, "--probes", "10")


def test_palace_of_another_model_is_re_embedded(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SAMPLE_PALACE, src)
    (src / "mempalace_embedder.json").write_text(json.dumps({"mempalace_drawers": {"model_name": "embeddinggemma",
                                                                                 "dimension": 384}}))
    r = cli_json("import", "palace", src, "--palace", tmp_path / "p")
    assert r["vectors_embedded"] == 7 and "embeddinggemma" in r["vector_decision"]


def test_palace_drawer_without_a_document_is_quarantined(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SAMPLE_PALACE, src)
    with sqlite3.connect(src / "chroma.sqlite3") as c:
        victim = c.execute("SELECT id FROM embedding_metadata WHERE key = 'chroma:document' ORDER BY id "
                           "LIMIT 1").fetchone()[0]
        c.execute("DELETE FROM embedding_metadata WHERE id = ? AND key = 'chroma:document'", (victim,))
    r = cli_json("import", "palace", src, "--palace", tmp_path / "p", check=3)
    assert (r["quarantined"], r["drawers_written"]) == (1, 6)
    assert "chroma.sqlite3: drawer drawer_" in r["quarantine_first"][0]  # the file and the drawer it names

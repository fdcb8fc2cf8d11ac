"""The loader: idempotent re-runs, resume after SIGKILL, dry runs, carried vectors, identity checks."""
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from etl import runs
from etl.embed import MINILM, EmbedderIdentity
from etl.load import run_import
from etl.runs import source_fingerprint
from importers.base import ImportOptions, RowBuffer
from importers.registry import get_importer
from importers.schema import drawer_schema
from palace import chroma_sqlite
from palace.errors import EmbedderMismatch
from palace.kg import KnowledgeGraph
from palace.layout import read_sidecar, write_sidecar
from palace.stores import open_store

from .helpers import (
    CORPUS,
    cli_json,
    copy_kg,
    copy_palace_files,
    palace_rows,
    put_kg_back,
    run_cli,
)

MEMORY = CORPUS / "mcp-memory" / "memory.jsonl"


def write_memory(path: Path, entities: int, per_entity: int) -> int:
    lines = []
    for e in range(entities):
        obs = [f"Entity {e} fact {i}: the nightly job {i * 7 % 13} ran on host {e % 5}" for i in range(per_entity)]
        lines.append(orjson.dumps({"type": "entity", "name": f"entity-{e}", "entityType": f"kind{e % 4}",
                                   "observations": obs}))
        if e:
            lines.append(orjson.dumps({"type": "relation", "from": f"entity-{e}", "to": f"entity-{e - 1}",
                                       "relationType": "follows after"}))
    path.write_bytes(b"\n".join(lines))
    return entities * per_entity


def test_second_import_writes_nothing(tmp_path):
    palace = tmp_path / "p"
    first = cli_json("import", "mcp-memory", MEMORY, "--palace", palace)
    assert (first["drawers_written"], first["vectors_embedded"]) == (47, 47)
    before = palace_rows(palace)
    second = cli_json("import", "mcp-memory", MEMORY, "--palace", palace)
    assert second["drawers_written"] == 0 and second["drawers_unchanged"] == 47
    assert second["vectors_embedded"] == 0 and second["kg_rows_written"] == 0
    assert palace_rows(palace) == before  # not even filed_at moved
    run_cli("verify", "--palace", palace, "--against", "mcp-memory", MEMORY)


def test_dry_run_writes_nothing(tmp_path):
    palace = tmp_path / "p"
    plan = cli_json("import", "mcp-memory", MEMORY, "--palace", palace, "--dry-run")
    assert plan["dry_run"] and plan["drawers_written"] == 47 and plan["vectors_embedded"] == 0
    assert sum(plan["per_room"]["mcp_memory"].values()) == 47
    assert not palace.exists()
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace)
    again = cli_json("import", "mcp-memory", MEMORY, "--palace", palace, "--dry-run")
    assert again["drawers_written"] == 0 and again["drawers_unchanged"] == 47


def test_edited_source_rewrites_only_changed_drawers(tmp_path):
    palace, src = tmp_path / "p", tmp_path / "memory.jsonl"
    write_memory(src, 10, 3)
    cli_json("import", "mcp-memory", src, "--palace", palace)
    text = src.read_text().replace("Entity 3 fact 1:", "Entity 3 fact 1 (edited):")
    src.write_text(text)
    report = cli_json("import", "mcp-memory", src, "--palace", palace)
    # content ids: the edited observation is a new drawer; the old one stays (no deletes on import)
    assert report["drawers_written"] == 1 and report["drawers_unchanged"] == 29
    assert len(palace_rows(palace)) == 31


def kill_import(src: Path, spec: str, palace: Path, drawers: int) -> int:
    """Start ``import mcp-memory SRC --palace SPEC`` in batches of 100 and SIGKILL it once its ledger
    in ``palace`` has at least ``drawers`` committed; returns how many it had."""
    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "import", "mcp-memory", str(src), "--palace",
                             str(spec), "--batch-size", "100", "--quiet"])
    deadline = time.monotonic() + 240
    while (done := _committed_drawers(palace)) < drawers:
        assert proc.poll() is None, "the import finished before it could be killed; make the input larger"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return done


def _committed_drawers(palace: Path) -> int:
    db = palace / ".palace-etl" / "ledger.sqlite3"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("SELECT coalesce(sum(rows), 0) FROM batches WHERE kind='drawers'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize("backend", ["chroma", "pgvector"])
def test_sigkill_midway_then_resume(tmp_path, backend, request, monkeypatch):
    palace, src = tmp_path / "p", tmp_path / "memory.jsonl"
    spec = f"{backend}:{palace}"
    if backend == "pgvector":
        monkeypatch.setenv("MEMPALACE_PGVECTOR_DSN", request.getfixturevalue("postgres"))
    total = write_memory(src, 120, 12)  # 1,440 drawers in batches of 100
    done = kill_import(src, spec, palace, 400)
    partial = cli_json("status", "--palace", spec)
    assert 0 < partial["drawers"] < total
    assert [r["status"] for r in partial["runs"]] == ["running"]  # visibly incomplete
    verify = run_cli("verify", "--palace", spec, "--json", check=4)
    assert "run_incomplete" in {f["code"] for f in json.loads(verify.stdout)["findings"]}

    report = cli_json("import", "mcp-memory", src, "--palace", spec, "--batch-size", "100")
    assert report["batches_resumed"] >= 4 and report["rows_resumed"] >= done
    assert report["drawers_read"] == total
    assert report["drawers_written"] + report["drawers_unchanged"] == total
    assert report["vectors_embedded"] == report["drawers_written"] <= total - done
    store = open_store(spec, read_only=True)
    docs = [d for page in store.rows("drawers", ("document",)) for _, d, _ in page]
    store.close()
    assert len(docs) == total  # nothing lost, nothing twice
    assert sorted(docs) == sorted(
        f"entity-{e} (kind{e % 4}): Entity {e} fact {i}: the nightly job {i * 7 % 13} ran on host {e % 5}"
        for e in range(120) for i in range(12))
    status = cli_json("status", "--palace", spec)
    assert status["kg"]["triples"] == 119 and status["kg"]["entities"] == 120
    run_cli("verify", "--palace", spec, "--against", "mcp-memory", src)


def test_a_killed_run_of_a_source_edited_since_is_superseded_by_the_next_complete_run(tmp_path):
    """The re-run that status and verify advise imports the source as it now is: a new run (the
    fingerprint changed), which settles the killed one instead of leaving it incomplete for ever."""
    palace, src = tmp_path / "p", tmp_path / "memory.jsonl"
    write_memory(src, 120, 12)
    kill_import(src, palace, palace, 200)
    total = write_memory(src, 121, 12)  # edited since: one more entity
    report = cli_json("import", "mcp-memory", src, "--palace", palace, "--batch-size", "100")
    assert report["batches_resumed"] == 0 and report["drawers_read"] == total
    assert [r["status"] for r in cli_json("status", "--palace", palace)["runs"]] == ["superseded", "complete"]
    assert "run_incomplete" not in run_cli("verify", "--palace", palace).stderr
    cli_json("import", "mcp-memory", src, "--palace", palace, "--wing", "elsewhere")  # other options: another run
    kinds = [r["status"] for r in cli_json("status", "--palace", palace)["runs"]]
    assert kinds == ["superseded", "complete", "complete"]


def test_a_killed_run_is_not_resumed_into_a_palace_put_back_from_an_older_copy(tmp_path):
    """The batches a killed run committed are gone when the palace's files are put back from a copy
    taken before it (the state directory, with the run ledger, left as it was): a resume would skip
    them and lose those drawers. The re-run checks that the palace still holds what the ledger says
    it committed, and reads the source again from the start when it does not."""
    palace, src, monday = tmp_path / "p", tmp_path / "memory.jsonl", tmp_path / "p-of-monday"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace)  # what the palace held on Monday
    before = cli_json("status", "--palace", palace)["drawers"]
    copy_palace_files(palace, monday)
    total = write_memory(src, 120, 12)
    kill_import(src, palace, palace, 400 + before)
    copy_palace_files(monday, palace)  # Monday's files put back; .palace-etl stays as it was
    report = cli_json("import", "mcp-memory", src, "--palace", palace, "--batch-size", "100")
    assert report["batches_resumed"] == 0 and "not in the palace" in report["resume_refused"]
    assert report["drawers_written"] == total
    assert cli_json("status", "--palace", palace)["drawers"] == before + total
    run_cli("verify", "--palace", palace, "--against", "mcp-memory", src)


def test_a_killed_run_is_not_resumed_into_a_knowledge_graph_put_back_from_an_older_copy(tmp_path):
    """The same with the knowledge graph alone put back (Chroma's files and the run ledger left as
    they were): the triple batches the killed run committed are gone, and a resume would skip them."""
    palace, src, monday = tmp_path / "p", tmp_path / "memory.jsonl", tmp_path / "kg-of-monday.sqlite3"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace)  # what the palace held on Monday
    kg = palace / "knowledge_graph.sqlite3"
    copy_kg(kg, monday)
    write_memory(src, 120, 12)
    kill_import(src, palace, palace, 400)
    with sqlite3.connect(palace / ".palace-etl" / "ledger.sqlite3") as c:
        assert c.execute("SELECT count(*) FROM batches WHERE kind = 'triples'").fetchone()[0] > 0
    put_kg_back(monday, kg)  # Monday's KG put back
    report = cli_json("import", "mcp-memory", src, "--palace", palace, "--batch-size", "100")
    assert report["batches_resumed"] == 0 and "not in the palace" in report["resume_refused"]
    assert " triples" in report["resume_refused"] and "entity-" not in report["resume_refused"]  # counts, no ids
    run_cli("verify", "--palace", palace, "--against", "mcp-memory", src)  # every triple is there


def test_a_killed_run_whose_triple_an_open_one_already_said_is_resumed(tmp_path):
    """A triple is not written when an open one says the same under another id (MemPalace's rule):
    its id is then not in the palace, and must not make a resume look lost."""
    palace, src = tmp_path / "p", tmp_path / "memory.jsonl"
    write_memory(src, 120, 12)
    with KnowledgeGraph(palace / "knowledge_graph.sqlite3") as g:  # the source's first relation, said by MemPalace
        g.write_batch([], [("t_said_by_mempalace", "entity-1", "follows_after", "entity-0", None, None, 1.0, None,
                            None, "mempalace")])
    kill_import(src, palace, palace, 400)
    report = cli_json("import", "mcp-memory", src, "--palace", palace, "--batch-size", "100")
    assert report["batches_resumed"] > 0 and not report["resume_refused"]


def test_a_killed_run_one_of_whose_checked_drawers_was_forgotten_since_is_resumed(tmp_path):
    """A drawer a resume would check, erased by ``forget`` after the kill, is gone on purpose: no
    byte of its id stays in the run ledger, the run resumes, and the drawer is not written again."""
    palace, src = tmp_path / "p", tmp_path / "memory.jsonl"
    write_memory(src, 120, 12)
    kill_import(src, palace, palace, 400)
    with sqlite3.connect(palace / ".palace-etl" / "ledger.sqlite3") as c:
        (sample,) = c.execute("SELECT sample FROM batches WHERE kind = 'drawers' ORDER BY seq LIMIT 1").fetchone()
    erased = json.loads(sample)[0]
    receipt = cli_json("forget", "--palace", palace, "--id", erased)["receipt"]
    assert any("ledger.sqlite3: the ids dropped from 1 resume samples" in line for line in receipt)
    assert not [f for f in (palace / ".palace-etl").glob("ledger.sqlite3*") if erased.encode() in f.read_bytes()]
    report = cli_json("import", "mcp-memory", src, "--palace", palace, "--batch-size", "100")
    assert report["batches_resumed"] > 0 and not report["resume_refused"]
    assert erased not in palace_rows(palace)


def test_a_ledger_written_before_samples_were_kept_is_opened_and_resumed(tmp_path):
    state = tmp_path / ".palace-etl"
    state.mkdir(mode=0o700)
    with sqlite3.connect(state / "ledger.sqlite3") as c:  # the tables as earlier versions made them
        c.executescript(runs._LEDGER_SQL)
        c.execute("INSERT INTO runs VALUES ('r', 'jsonl', '/x', 'f', '{}', 'interrupted', 0, NULL, NULL)")
        c.execute("INSERT INTO batches VALUES ('r', 0, 'drawers', 10, 10, 0)")
    ledger = runs.Ledger(state)
    try:
        assert ledger.start("r", "jsonl", Path("/x"), "f", {}) == 0
        ledger.committed("r", 1, "drawers", 5, 5, ["drawer_a", "drawer_b"])
        assert ledger.held("r", "drawers") == ["drawer_a", "drawer_b"]  # the old batch has none to check
    finally:
        ledger.close()


def test_a_source_written_within_the_clock_tick_is_fingerprinted_once_it_settled(tmp_path, monkeypatch):
    """Before Linux 6.13 (and on whole-second file systems) a write in the same clock tick as the one
    before leaves the stamp as it was: a fingerprint taken then could match other content later, and
    a re-run would resume this run over it. The fingerprint waits until the tick has passed; a source
    that never settles gets a fingerprint no re-run shares."""
    monkeypatch.setattr(chroma_sqlite, "RACY_NS", 500_000_000)  # a coarse clock's tick
    src = tmp_path / "memory.jsonl"
    write_memory(src, 3, 2)
    first = source_fingerprint(src)
    assert time.time_ns() - src.stat().st_mtime_ns >= chroma_sqlite.RACY_NS
    assert source_fingerprint(src) == first  # settled: the same source, the same run
    monkeypatch.setattr(runs, "unsettled", lambda mtimes: 0.01)  # still being written, try after try
    assert source_fingerprint(src) != source_fingerprint(src)


class VectorImporter:
    """A real importer whose source carries vectors (as mcp-memory-service and bundles do)."""

    name = "test-vectors"

    def __init__(self, texts, vectors, identity: EmbedderIdentity):
        self.texts, self.vectors, self.identity = texts, vectors, identity

    def detect(self, path):
        return False

    def batches(self, path, options, quarantine):
        buf = RowBuffer(self.name, 1000)
        for i, t in enumerate(self.texts):
            buf.drawer(id=f"drawer_w_r_{i:024d}", document=t, wing="w", room="r", source_file=str(path),
                       chunk_index=i, origin_id=str(i))
        (batch,) = list(buf.flush())
        schema = drawer_schema(self.identity.dimension, self.identity.model_name)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(self.vectors.ravel(), pa.float32()),
                                                self.identity.dimension)
        yield pa.RecordBatch.from_arrays([*batch.columns, emb], schema=schema)


def test_carried_vectors_are_not_re_embedded(tmp_path, embedder):
    texts = [f"carried memory number {i} about the palace" for i in range(30)]
    vecs = embedder.embed(texts)
    store = open_store(tmp_path / "p")
    before = embedder.calls
    report = run_import(VectorImporter(texts, vecs, MINILM), tmp_path, store, ImportOptions(),
                        lambda: embedder, MINILM, progress=False)
    assert report.vectors_carried == 30 and report.vectors_embedded == 0
    assert embedder.calls == before
    assert report.vector_decision.startswith("carry")
    # vectors of another model are re-embedded, and the decision says so
    other = run_import(VectorImporter([t + " (v2)" for t in texts], vecs, EmbedderIdentity("openai-compat", 384)),
                       tmp_path, store, ImportOptions(), lambda: embedder, MINILM, progress=False)
    assert other.vectors_embedded == 30 and other.vectors_carried == 0
    assert embedder.calls == before + 30
    assert "re-embed" in other.vector_decision


def test_palace_of_another_embedder_is_refused(tmp_path):
    palace = tmp_path / "p"
    cli_json("import", "mcp-memory", MEMORY, "--palace", palace)
    assert read_sidecar(palace) == MINILM
    write_sidecar(palace, EmbedderIdentity("openai-compat", 768))
    proc = run_cli("import", "mcp-memory", MEMORY, "--palace", palace, "--wing", "again", check=1)
    assert "openai-compat/768" in proc.stderr and "minilm/384" in proc.stderr
    with pytest.raises(EmbedderMismatch):
        run_import(get_importer("mcp-memory"), MEMORY, open_store(palace), ImportOptions(wing="again"),
                   lambda: None, MINILM, progress=False)
    assert cli_json("status", "--palace", palace)["drawers"] == 47


def test_sigterm_midway_leaves_both_databases_consistent_then_resumes(tmp_path):
    palace, src = tmp_path / "p", tmp_path / "memory.jsonl"
    total = write_memory(src, 100, 12)
    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "import", "mcp-memory", str(src), "--palace",
                             str(palace), "--batch-size", "100", "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _committed_drawers(palace) < 300:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "re-run the same command to resume" in err
    kg_wal = palace / "knowledge_graph.sqlite3-wal"
    assert not kg_wal.exists() or kg_wal.stat().st_size == 0  # checkpointed on the way out
    for db in ("chroma.sqlite3", "knowledge_graph.sqlite3"):
        with sqlite3.connect(f"file:{palace / db}?mode=ro", uri=True) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r["status"] for r in cli_json("status", "--palace", palace)["runs"]] == ["interrupted"]
    # the lock was released: a new run starts at once and resumes
    report = cli_json("import", "mcp-memory", src, "--palace", palace, "--batch-size", "100", "--lock-timeout", "0")
    assert report["batches_resumed"] >= 1 and report["drawers_read"] == total
    assert len(palace_rows(palace)) == total
    run_cli("verify", "--palace", palace, "--against", "mcp-memory", src)


def test_a_re_run_writes_nothing_even_for_floats_chroma_shortens(tmp_path):
    """Chroma keeps about 16 significant digits of a float: 1764623456.5890787 comes back as
    1764623456.589079. The stored value is the same value, so a re-run must not rewrite the drawer."""
    import json as _json

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(_json.dumps({"id": f"r{i}", "text": f"row {i}", "metadata": {"mtime": 1764623456.5890787 + i,
                                                                                         "score": 0.1 + i / 3}}) + "\n"
                           for i in range(20)))
    first = cli_json("import", "jsonl", src, "--palace", tmp_path / "p")
    assert first["drawers_written"] == 20
    again = cli_json("import", "jsonl", src, "--palace", tmp_path / "p")
    assert again["drawers_written"] == 0 and again["drawers_unchanged"] == 20

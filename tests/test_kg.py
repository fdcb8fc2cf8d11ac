"""The knowledge graph: MemPalace's schema exactly, bulk IMMEDIATE transactions, no 'database is locked'."""
import sqlite3
import threading

import pytest
from mempalace.knowledge_graph import KnowledgeGraph as MpKG

from palace.errors import PalaceLocked
from palace.kg import KnowledgeGraph


def schema(path):
    with sqlite3.connect(path) as c:
        rows = c.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        return sorted((t, n, " ".join(sql.replace("(", " ( ").replace(")", " ) ").split())) for t, n, sql in rows)


def test_schema_is_mempalaces(tmp_path):
    ours, theirs = tmp_path / "ours.sqlite3", tmp_path / "theirs.sqlite3"
    KnowledgeGraph(ours).close()
    MpKG(str(theirs)).close()
    assert schema(ours) == schema(theirs)
    with sqlite3.connect(ours) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bulk_write_is_idempotent_and_mempalace_reads_it(tmp_path):
    path = tmp_path / "kg.sqlite3"
    ents = [("alice", "Alice", "person", "{}")]
    triples = [(f"t_alice_knows_p{i}_000000000000", "Alice", "knows", f"P{i}", None, None, 1.0, "src", None,
                "palace-etl:test") for i in range(500)]
    with KnowledgeGraph(path) as kg:
        assert kg.write_batch(ents, triples) == (501, 500)  # 1 entity + 500 auto-created endpoints
        assert kg.write_batch(ents, triples) == (0, 0)
    mp = MpKG(str(path))
    facts = mp.query_entity("Alice")
    assert len(facts) == 500 and facts[0]["predicate"] == "knows"
    mp.close()


def test_open_triple_already_in_mempalace_is_not_duplicated(tmp_path):
    path = tmp_path / "kg.sqlite3"
    mp = MpKG(str(path))
    mp.add_triple("Alice", "works at", "Acme")
    mp.close()
    with KnowledgeGraph(path) as kg:
        kg.write_batch([], [("t_alice_works_at_acme_ours00000000", "Alice", "works_at", "Acme", None, None, 1.0,
                             None, None, "palace-etl:test")])
        assert kg.counts()["triples"] == 1


def test_write_waits_for_another_writer_then_succeeds(tmp_path):
    path = tmp_path / "kg.sqlite3"
    KnowledgeGraph(path).close()
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("INSERT INTO entities (id, name) VALUES ('x', 'X')")
    committed = threading.Event()

    def commit():
        blocker.execute("COMMIT")
        committed.set()

    threading.Timer(1.5, commit).start()
    with KnowledgeGraph(path) as kg:
        kg.write_batch([("bob", "Bob", "person", "{}")], [])
        assert committed.is_set()  # our write got in only after the other writer let go...
        assert kg.counts()["entities"] == 2  # ...and neither write was lost
    blocker.close()


def test_write_fails_clearly_after_the_timeout(tmp_path):
    path = tmp_path / "kg.sqlite3"
    KnowledgeGraph(path).close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        kg = KnowledgeGraph(path, busy_timeout_ms=300)
    except PalaceLocked as exc:  # the schema check itself may be the write that waits
        assert "kept it locked for 0.3s" in str(exc)
    else:
        with pytest.raises(PalaceLocked, match="kept it locked for 0.3s"):
            kg.write_batch([("bob", "Bob", "person", "{}")], [])
        kg.close()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()  # the message names the 0.3 s it was given, not the 60 s default


def test_close_checkpoints_the_wal(tmp_path):
    path = tmp_path / "kg.sqlite3"
    kg = KnowledgeGraph(path)
    kg.write_batch([(f"e{i}", f"E{i}", "t", "{}") for i in range(2000)], [])
    kg.close()
    wal = tmp_path / "kg.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0

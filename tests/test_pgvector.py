"""pgvector palaces -- MemPalace 3.11's own engine for many machines -- on a real PostgreSQL 16 +
pgvector started by the suite (``postgres`` in conftest): moved to and from Chroma without
re-embedding, backed up and restored, written by several processes and a live MemPalace at once."""
from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from palace.stores import PgVectorStore, open_store

from .helpers import SAMPLE, StdioMcp, cli_json, run_cli


def rows_of(spec: str) -> dict[str, tuple]:
    """{id: (document, metadata, vector)} of every drawer and closet, through our store."""
    store = open_store(spec, read_only=True)
    try:
        out = {}
        for table in ("drawers", "closets"):
            ids = [i for page in store.rows(table, ()) for i, _, _ in page]
            for page in store.fetch(table, ids):
                for r in page:
                    out[(table, r["id"])] = (r["document"], r["metadata"], np.asarray(r["embedding"], np.float32))
        return out
    finally:
        store.close()


def test_a_chroma_palace_moved_to_pgvector_and_back_is_identical(tmp_path, postgres, monkeypatch):
    monkeypatch.setenv("MEMPALACE_PGVECTOR_DSN", postgres)
    chroma, pg, back = tmp_path / "chroma", tmp_path / "pg", tmp_path / "back"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", chroma)
    there = cli_json("migrate", chroma, f"pgvector:{pg}")
    assert there["sync"]["converged"] and there["verify"]["ok"] and there["sync"]["plan"]["to_b"]["drawers"] == 363
    assert (pg / "pgvector_backend.json").is_file() and not (pg / "chroma.sqlite3").exists()
    assert isinstance(open_store(str(pg)), PgVectorStore)  # the marker says what it is from now on
    home = cli_json("migrate", pg, back)
    assert home["verify"]["ok"] and (back / "chroma.sqlite3").is_file()
    a, b = rows_of(str(chroma)), rows_of(str(back))
    assert a.keys() == b.keys() and len(a) == 363
    for key, (doc, meta, vec) in a.items():
        assert b[key][0] == doc and b[key][1] == meta
        assert np.allclose(b[key][2], vec, atol=1e-6)  # carried, never re-embedded
    assert cli_json("status", "--palace", back)["kg"]["triples"] == 223
    # a target that already holds a palace is refused, nothing written
    again = run_cli("migrate", chroma, f"pgvector:{pg}", check=1)
    assert "already holds a palace" in again.stderr


def test_export_restore_and_incrementals_of_a_pgvector_palace(tmp_path, pgvector_env):
    palace, backups, restored = tmp_path / "palace", tmp_path / "backups", tmp_path / "restored"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    full = cli_json("export", "--palace", palace, "--out", backups)
    assert full["totals"]["drawers"] == 363 and full["totals"]["triples"] == 223
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"id": f"x{i}", "text": f"an extra memory number {i}"}) + "\n"
                             for i in range(7)))
    cli_json("import", "jsonl", extra, "--palace", palace)
    incr = cli_json("export", "--palace", palace, "--out", backups, "--incremental")
    assert incr["kind"] == "incremental" and incr["counts"]["drawers"] == 7
    r = cli_json("restore", incr["bundle"], "--palace", f"pgvector:{restored}")
    assert r["rows"]["drawers"] == 370
    run_cli("verify", "--palace", palace, "--palace", restored)
    run_cli("verify", "--palace", restored, "--against", "mcp-memory", SAMPLE, "--against", "jsonl", extra)
    # --force keeps the replaced tables aside instead of dropping them
    forced = cli_json("restore", full["bundle"], "--palace", restored, "--force")
    assert forced["replaced"] and cli_json("status", "--palace", restored)["drawers"] == 363
    # forget cannot open the tables kept aside, and says so: they hold what the palace held
    f = run_cli("forget", "--palace", restored, "--id", "x0")
    assert f"PostgreSQL table {forced['replaced']} (kept aside by a restore) was not reached" in f.stderr
    kg_aside = [a for a in cli_json("forget", "--palace", restored, "--id", "x0", "--dry-run")["aside_unreached"]
                if not a.startswith("PostgreSQL table")]
    assert [Path(a).name.split(".before-restore-")[0] for a in kg_aside] == ["knowledge_graph.sqlite3"]


def test_a_pgvector_palace_restored_from_an_older_bundle_has_rows_missing_not_deleted(tmp_path, pgvector_env):
    """A restore swaps a pgvector palace's tables but keeps its directory, and so its sync state:
    what it held at its last sync must not make the rows the older bundle lacks look deleted there,
    or the next sync would delete them from its replicas."""
    palace, backups, peer = tmp_path / "palace", tmp_path / "backups", f"chroma:{tmp_path / 'peer'}"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    full = cli_json("export", "--palace", palace, "--out", backups)
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"id": f"x{i}", "text": f"a memory after the backup {i}"}) + "\n"
                             for i in range(3)))
    cli_json("import", "jsonl", extra, "--palace", palace)
    assert cli_json("sync", palace, peer)["converged"]
    cli_json("restore", full["bundle"], "--palace", palace, "--force")
    r = cli_json("sync", palace, peer)
    assert r["converged"] and r["plan"]["delete_b"] == {} and r["plan"]["to_a"] == {"drawers": 3}
    assert cli_json("status", "--palace", peer)["drawers"] == 366


def test_a_pgvector_palace_whose_tables_were_made_anew_has_rows_missing_not_deleted(tmp_path, pgvector_env):
    """Its tables replaced by older ones outside palace-etl (say, a pg_restore of an older dump): the
    sync state in its directory still lists the rows written since, which would look deleted. Tables
    made anew (another oid) set that state aside, and the sync copies the rows back."""
    import psycopg

    palace, peer = tmp_path / "palace", f"chroma:{tmp_path / 'peer'}"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    assert cli_json("sync", palace, peer)["converged"]
    store = open_store(str(palace))
    table = store._q("drawers")
    store.close()
    with psycopg.connect(pgvector_env, autocommit=True) as c:  # the older dump lacks two drawers
        ids = [r[0] for r in c.execute(f"SELECT id FROM {table} ORDER BY id LIMIT 2")]
        c.execute(f"CREATE TABLE older_dump (LIKE {table} INCLUDING ALL)")
        c.execute(f"INSERT INTO older_dump SELECT * FROM {table} WHERE id <> ALL(%s)", (ids,))
        c.execute(f"DROP TABLE {table}")
        c.execute(f"ALTER TABLE older_dump RENAME TO {table}")
    r = cli_json("sync", palace, peer)
    assert r["converged"] and r["plan"]["delete_b"] == {} and r["plan"]["to_a"] == {"drawers": 2}
    assert "made anew" in r["went_back"]["a"]
    assert cli_json("status", "--palace", peer)["drawers"] == 363


def test_three_imports_and_a_live_mempalace_writer_at_once_lose_nothing(tmp_path, pgvector_env):
    """No host-local lease on pgvector: PostgreSQL keeps every writer's rows -- three palace-etl
    imports and a real stdio ``mempalace-mcp`` filing memories through ``tools/call``, all at once."""
    palace = tmp_path / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)  # the palace exists before the race
    sources = []
    for k in range(3):
        src = tmp_path / f"part{k}.jsonl"
        src.write_text("".join(json.dumps({"id": f"p{k}-{i}", "text": f"process {k} memory {i}", "room": f"r{k}"})
                               + "\n" for i in range(100)))
        sources.append(src)
    server = StdioMcp(palace)
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "etl.cli", "import", "jsonl", str(s), "--palace",
                                   str(palace), "--json", "--batch-size", "25"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for s in sources]
        for i in range(60):  # while the imports run
            server.add_drawer(f"the live MemPalace filed memory {i}", room="mcp")
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-2000:]
    finally:
        server.close()
    store = open_store(str(palace))
    docs = collections.Counter(d for page in store.rows("drawers", ("document",)) for _, d, _ in page)
    store.close()
    assert len(docs) == 363 + 300 + 60 and set(docs.values()) == {1}
    for s in sources:
        run_cli("verify", "--palace", palace, "--against", "jsonl", s)
    assert cli_json("status", "--palace", palace, "--probes", "1000")["self_hit_rate"] == 1.0


def test_machines_sharing_one_namespace_share_the_drawers_and_sync_their_knowledge_graphs(tmp_path, pgvector_env,
                                                                                           monkeypatch):
    """Two machines' palace directories on one shared namespace resolve the same tables (MemPalace's
    ``pgvector_shared_namespace``); a sync between them moves only the KG file's rows."""
    monkeypatch.setenv("MEMPALACE_PGVECTOR_SHARED_NAMESPACE", "team fleet")
    one, two = tmp_path / "machine-one" / "palace", tmp_path / "machine-two" / "palace"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", one)
    assert cli_json("status", "--palace", two)["drawers"] == 363  # the same tables, seen from the other path
    r = cli_json("sync", one, two)
    assert r["converged"] and "drawers" not in r["plan"]["to_b"] and r["plan"]["to_b"]["triples"] == 223
    assert cli_json("status", "--palace", two)["kg"]["triples"] == 223
    assert (two / "pgvector_backend.json").is_file()  # machine two is now a palace MemPalace opens
    marker = json.loads((two / "pgvector_backend.json").read_text())
    assert marker["pgvector"]["shared_namespace"] == "team_fleet"


def test_the_dsn_flag_and_a_missing_driver_are_named(tmp_path, postgres):
    """``--pgvector-dsn`` drives a run on its own; an unreachable server and a missing psycopg are
    clear errors naming the fix, with nothing written."""
    env = {"MEMPALACE_BACKEND": "pgvector", "MEMPALACE_PGVECTOR_DSN": "postgresql://nobody@127.0.0.1:1/none"}
    palace = tmp_path / "palace"
    down = run_cli("import", "mcp-memory", SAMPLE, "--palace", palace, env=env, check=1)
    assert "cannot reach PostgreSQL" in down.stderr and "--pgvector-dsn" in down.stderr
    assert not palace.exists()  # refused before anything was created
    ok = run_cli("--pgvector-dsn", postgres, "import", "mcp-memory", SAMPLE, "--palace", palace, "--json", env=env)
    assert json.loads(ok.stdout)["drawers_written"] == 363
    blocked = tmp_path / "no-psycopg"
    blocked.mkdir()
    (blocked / "psycopg.py").write_text("raise ImportError('psycopg is not installed here')\n")
    missing = run_cli("--pgvector-dsn", postgres, "status", "--palace", palace,
                      env={**env, "PYTHONPATH": f"{blocked}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}, check=1)
    assert "palace-etl[postgres]" in missing.stderr


def test_text_postgres_cannot_store_is_cleaned_as_mempalace_cleans_it(tmp_path, pgvector_env):
    """NUL (which PostgreSQL rejects in text and jsonb) and lone surrogates are stripped from ids,
    documents and metadata, so one stray byte never aborts a whole import."""
    store = open_store(str(tmp_path / "palace"))
    try:
        vec = np.full(384, 1 / np.sqrt(384), dtype=np.float32)
        store.write("drawers", [{"id": "x\x00y", "document": "before\x00after \ud800 end",
                                 "metadata": {"wing": "w\x00", "note": "lone \udfff"}, "embedding": vec}])
        (row,) = [r for page in store.fetch("drawers", ["xy"]) for r in page]
        assert row["document"] == "beforeafter  end" and row["metadata"] == {"wing": "w", "note": "lone "}
        assert np.allclose(row["embedding"], vec)
    finally:
        store.close()


class PrivateCluster:
    """A PostgreSQL cluster of one test's own (``pgserver``'s binaries), which the test may stop,
    put back from a base backup (``pg_basebackup``, as an administrator restores last night's),
    and start again."""

    def __init__(self, root):
        import pgserver

        self.root, self.data = root, root / "data"
        self.bin = Path(pgserver.__file__).parent / "pginstall" / "bin"
        server = pgserver.get_server(self.data, cleanup_mode=None)
        self.dsn, self.user = server.get_uri(), server.system_user

    def _ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", *args], pgdata=self.data, user=self.user)

    def backup(self, name: str) -> Path:
        subprocess.run([str(self.bin / "pg_basebackup"), "-d", self.dsn, "-D", str(self.root / name), "-X", "stream",
                        "-c", "fast"], check=True, capture_output=True)
        return self.root / name

    def put_back(self, backup: Path) -> None:
        self.stop()
        owner = self.data.stat()
        shutil.rmtree(self.data)
        shutil.copytree(backup, self.data, ignore=shutil.ignore_patterns(".s.PGSQL.*"))
        for p in [self.data, *self.data.rglob("*")]:
            os.chown(p, owner.st_uid, owner.st_gid, follow_symlinks=False)
        self.data.chmod(0o700)
        self._ctl("-o", '-h ""', "-o", f"-k {self.data}", "-l", str(self.data / "log"), "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("-m", "fast", "stop")


@pytest.fixture
def private_cluster(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    cluster = PrivateCluster(Path(tempfile.mkdtemp(prefix="pgp-")))  # short: the socket path's 107 bytes
    monkeypatch.setenv("MEMPALACE_BACKEND", "pgvector")
    monkeypatch.setenv("MEMPALACE_PGVECTOR_DSN", cluster.dsn)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def _insert(dsn: str, table: str, ids: list[str]) -> None:
    """Drawers written as MemPalace's pgvector backend writes them, one transaction each."""
    import psycopg

    vec = "[" + ",".join(["0.05"] * 384) + "]"
    with psycopg.connect(dsn, autocommit=True) as c:
        for i in ids:
            c.execute(f"INSERT INTO {table} (id, document, metadata, embedding, updated_at) "
                      "VALUES (%s, %s, %s, %s::vector, now())", (i, f"note {i}", json.dumps({"wing": "w", "room": "r"}), vec))


@pytest.mark.parametrize("written_on", [0, 12])
def test_a_pgvector_palace_whose_database_was_put_back_from_a_backup_has_rows_missing_not_deleted(
        tmp_path, private_cluster, written_on):
    """The PostgreSQL cluster restored from Monday's base backup (the tables keep their oids), the
    palace's directory left as it was: Tuesday's drawers are missing, not deleted, whether the sync
    comes before any write (the transaction counter is lower than at the last sync) or after more
    transactions than Monday's backup lacked (their numbers come again, on other rows)."""
    palace, peer = tmp_path / "palace", f"chroma:{tmp_path / 'peer'}"
    cli_json("import", "mcp-memory", SAMPLE, "--palace", palace)
    assert cli_json("sync", palace, peer)["converged"]
    monday = private_cluster.backup("monday")
    store = open_store(str(palace))
    table = store._q("drawers")
    store.close()
    _insert(private_cluster.dsn, table, ["drawer_tue_1", "drawer_tue_2"])
    assert cli_json("sync", palace, peer)["converged"]
    private_cluster.put_back(monday)
    _insert(private_cluster.dsn, table, [f"drawer_wed_{k}" for k in range(written_on)])
    r = cli_json("sync", palace, peer)
    assert r["converged"] and r["plan"]["delete_b"] == {} and r["plan"]["to_a"] == {"drawers": 2}
    assert "older backup" in r["went_back"]["a"]
    assert cli_json("status", "--palace", peer)["drawers"] == 363 + 2 + written_on
    assert cli_json("sync", palace, peer)["went_back"] == {}

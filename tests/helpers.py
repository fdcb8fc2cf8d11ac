"""Shared test helpers: run the real CLI and MemPalace in subprocesses, read palaces back."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from palace.lock import lock_path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "fixtures" / "corpus"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAMPLE = REPO / "sample_data" / "mcp-memory" / "memory.jsonl"


def run_cli(*args: str, check: int | None = 0, env: dict | None = None, timeout: float | None = None,
            subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run ``palace-etl ARGS``; assert its exit code when ``check`` is not None.

    In this process (the CLI's own ``main``: same parsing, error mapping and exit codes, without an
    interpreter start per call) unless the test is about processes: it sets ``env``, bounds a
    possible hang with ``timeout``, asks for ``subprocess_``, or the whole run sets
    ``PALACE_ETL_TEST_SUBPROCESS=1``."""
    args = tuple(map(str, args))
    if env is not None or timeout is not None or subprocess_ or os.environ.get("PALACE_ETL_TEST_SUBPROCESS") == "1":
        proc = subprocess.run([sys.executable, "-m", "etl.cli", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout or 600)
    else:
        proc = _in_process(args)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _in_process(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import signal

    from etl.cli import app as cli

    out, err = io.StringIO(), io.StringIO()
    argv, sigterm, code = sys.argv, signal.getsignal(signal.SIGTERM), 0
    sys.argv = ["palace-etl", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)
        cli.DEBUG["on"] = False
    return subprocess.CompletedProcess(["palace-etl", *args], code, out.getvalue(), err.getvalue())


def flip_a_byte(path: Path) -> None:
    """Damage ``path`` in place: the middle byte's lowest bit flipped (same size)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def cli_json(*args: str, check: int | None = 0) -> dict:
    return json.loads(run_cli(*args, "--json", check=check).stdout)


def run_python(code: str, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter; it hands back one object with ``emit(obj)``.

    The result travels through a file: MemPalace's MCP module redirects stdout.
    """
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        prelude = f"import json as _json\ndef emit(obj):\n    open({out.name!r}, 'w').write(_json.dumps(obj))\n"
        proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        return json.loads(Path(out.name).read_text())


def palace_rows(palace: Path, collection: str = "mempalace_drawers", vectors: bool = False) -> dict[str, dict]:
    """{id: {document, metadata[, embedding]}} of every row, read through chromadb in a subprocess."""
    code = f"""
import chromadb
c = chromadb.PersistentClient({str(palace)!r})
names = [x.name for x in c.list_collections()]
out = {{}}
if {collection!r} in names:
    col = c.get_collection({collection!r})
    include = ["documents", "metadatas"] + (["embeddings"] if {vectors!r} else [])
    n = col.count()
    for off in range(0, n, 5000):
        got = col.get(include=include, limit=5000, offset=off)
        for k, i in enumerate(got["ids"]):
            out[i] = {{"document": got["documents"][k], "metadata": got["metadatas"][k]}}
            if {vectors!r}:
                out[i]["embedding"] = [float(x) for x in got["embeddings"][k]]
emit(out)
"""
    return run_python(code)


def kill_mid_transaction(db: Path) -> None:
    """A writer SIGKILLed inside a transaction whose pages already spilled into the file: a hot journal."""
    code = (f"import sqlite3, os, signal\nc = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "c.execute('PRAGMA cache_size=1')\nc.execute('BEGIN IMMEDIATE')\n"
            "c.execute(\"UPDATE embedding_metadata SET string_value = 'torn' WHERE key = 'chroma:document'\")\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    journal = Path(f"{db}-journal")
    assert journal.exists() and journal.stat().st_size > 0


def kg_rows(kg: Path, table: str) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(f"file:{kg}?mode=ro", uri=True) as c:
        return c.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_chroma(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Block until a ``chroma run`` server answers its heartbeat (or fail if it died or took too long)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "chroma run did not come up"
        time.sleep(0.2)


def lease_held(palace: Path) -> bool:
    path = lock_path(palace)
    if not path.exists():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


class LiveHub:
    """A real ``mempalace serve`` hub on 127.0.0.1 over ``palace``, started by the test."""

    def __init__(self, palace: Path):
        self.palace, self.port = palace, free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: subprocess.Popen | None = None
        self._calls = 0

    def start(self) -> "LiveHub":
        # its output goes to a file: a pipe nobody reads fills after a few hundred calls and stalls the hub
        self.log = self.palace.parent / f"hub-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(BIN / "mempalace"), "serve", "--palace", str(self.palace), "--host",
                                          "127.0.0.1", "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "MEMPALACE_SYNC_INTERVAL": "3600"})
        deadline = time.monotonic() + 120
        while not (lease_held(self.palace) and self._answers()):
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the hub never took the palace lease"
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def tool(self, name: str, **arguments) -> dict:
        self._calls += 1
        answer = httpx.post(self.url, json={"jsonrpc": "2.0", "id": self._calls, "method": "tools/call",
                                            "params": {"name": name, "arguments": arguments}}, timeout=120).json()
        return json.loads(answer["result"]["content"][0]["text"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


class StdioMcp:
    """A real stdio ``mempalace-mcp --palace P``, initialised, spoken to one JSON-RPC line at a time."""

    def __init__(self, palace: Path):
        self.proc = subprocess.Popen([str(BIN / "mempalace-mcp"), "--palace", str(palace)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.pid, self._n = self.proc.pid, 0
        self.call("initialize", {"protocolVersion": "2024-11-05", "capabilities": {},
                                 "clientInfo": {"name": "palace-etl-tests", "version": "1"}})

    def call(self, method: str, params: dict) -> dict:
        self._n += 1
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": self._n, "method": method, "params": params}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def add_drawer(self, text: str, wing: str = "live", room: str = "server") -> dict:
        """MemPalace's own answer to ``mempalace_add_drawer`` (its ``drawer_id`` on success)."""
        answer = self.call("tools/call", {"name": "mempalace_add_drawer",
                                          "arguments": {"wing": wing, "room": room, "content": text}})
        got = json.loads(answer["result"]["content"][0]["text"])
        assert got.get("success"), got
        return got

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def copy_palace_files(src: Path, dst: Path) -> None:
    """Every file and directory of the palace ``src`` but its palace-etl state directory, copied over
    what ``dst`` holds: a file-level backup taken, or put back (the state directory left as it was)."""
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name == ".palace-etl":
            continue
        target = dst / f.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, target)


def copy_kg(kg: Path, dst: Path) -> None:
    """A consistent copy of the knowledge graph ``kg`` at ``dst`` (SQLite's backup: WAL included)."""
    with sqlite3.connect(kg) as live, sqlite3.connect(dst) as copy:
        live.backup(copy)


def put_kg_back(copy: Path, kg: Path) -> None:
    """``copy`` put back as the knowledge graph ``kg``, its WAL and shared memory gone with the old file."""
    for f in (kg, kg.with_name(kg.name + "-wal"), kg.with_name(kg.name + "-shm")):
        f.unlink(missing_ok=True)
    shutil.copy2(copy, kg)

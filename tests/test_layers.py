"""The house's floors (pyproject.toml ``[tool.importlinter]``): etl.cli > etl > importers | exporters
> palace. The contracts run here, and a planted backwards import proves they can fail."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("etl", "importers", "exporters", "palace")
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT)], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_layering_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("planted, broken", [
    ("palace/_planted.py", "etl > importers | exporters > palace"),      # the core reaching up
    ("importers/_planted.py", "etl > importers | exporters > palace"),   # a floor reaching up
    ("exporters/_planted_cli.py", "only the CLI imports the CLI"),
])
def test_a_backwards_import_breaks_a_contract(tmp_path, planted, broken):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = "etl.cli.render" if "cli" in planted else "etl.load"
    (tmp_path / planted).write_text(f"import {target}  # noqa: F401\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert f"{broken} BROKEN" in done.stdout, done.stdout
    assert f"{Path(planted).with_suffix('').as_posix().replace('/', '.')} -> " in done.stdout

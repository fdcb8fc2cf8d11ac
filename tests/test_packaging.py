"""Packaging as a user installs it: every library the code imports is declared, and the built wheel
installs into a fresh virtual environment and runs from another directory."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from .helpers import REPO

PACKAGES = ("etl", "importers", "exporters", "palace")
OPTIONAL = {"click"}  # imported under `except ImportError` (typer may vendor it)


def imported_libraries(root: Path) -> set[str]:
    mods: set[str] = set()
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in PACKAGES}


def undeclared(root: Path) -> set[str]:
    """Distributions the code imports but pyproject.toml does not declare (as a dependency, or in a
    user-facing extra such as ``postgres``: the test extra does not count)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for name, extra in project.get("optional-dependencies", {}).items()
                                      if name != "test" for d in extra]
    declared = {d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for d in deps}
    dists = packages_distributions()
    out = set()
    for mod in imported_libraries(root) - OPTIONAL:
        names = {n.lower() for n in dists.get(mod, [mod])}
        if not names & declared:
            out.add(mod)
    return out


def test_every_library_the_code_imports_is_declared():
    assert "numpy" in imported_libraries(REPO)
    assert undeclared(REPO) == set()


def test_the_check_finds_a_planted_undeclared_import(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "palace" / "x.py").write_text("import numpy\nimport orjson\n")
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["orjson>=3"]\n')
    assert undeclared(tmp_path) == {"numpy"}


def test_the_built_wheel_installs_and_runs_from_another_directory(tmp_path):
    """Not editable: a wheel built from the tree, installed into a fresh venv. Its dependencies come from
    this environment's site-packages (a .pth line), so nothing is downloaded."""
    import shutil

    tree = tmp_path / "tree"  # built from a copy: a build/ left in the checkout would feed stale files to wheels
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                               "demo-palace", ".pytest_cache"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(tree)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("palace_etl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(vpy), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for args in (["--help"], ["sources"]):
        proc = subprocess.run([str(venv / "bin" / "palace-etl"), *args], cwd=elsewhere, capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert "mcp-memory" in proc.stdout and "basic-memory" in proc.stdout
    where = subprocess.run([str(vpy), "-c", "import etl; print(etl.__file__)"], cwd=elsewhere, capture_output=True,
                           text=True, env=env).stdout
    assert str(venv) in where  # the installed copy, not the source tree

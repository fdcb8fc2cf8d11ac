"""A clone of this repository alone runs its tests: no file reaches outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

from .helpers import REPO

# Ways a file could point at a folder beside the clone (the steering side's shared folder, the tool
# library, a sibling checkout): a relative path climbing out of the repository, or code walking above
# its root. The names are joined at run time so that this file does not itself read as such a path.
UP = "." + "./"
SIBLINGS = ("shared", ".library")
BESIDE = "/work/"  # where this project's checkout and its shared folder sit side by side
OUTSIDE = re.compile("|".join([*(re.escape(UP + s) for s in SIBLINGS), re.escape(BESIDE + SIBLINGS[0]),
                               r"REPO\.parent", r"parent\.parent\.parent"]))
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "demo-palace", "fixtures"}


def project_files(root: Path) -> list[Path]:
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not (set(rel.parts[:-1]) & SKIP_DIRS) and not p.name.endswith(".egg-info") \
                and p.suffix in {".py", ".md", ".toml", ".cfg", ".txt", ".sh", ""}:
            out.append(p)
    return out


def references_outside(root: Path) -> list[str]:
    hits = []
    for p in project_files(root):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) and p.name != Path(__file__).name:
                hits.append(f"{p.relative_to(root)}:{n}: {line.strip()}")
    return hits


def test_no_file_refers_to_a_folder_outside_the_repository():
    assert project_files(REPO), "found no project files to check"
    assert references_outside(REPO) == []


def test_the_check_finds_a_planted_reference(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helpers.py").write_text("CORPUS = REPO.parent / 'corpus'\n")
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text(f"cp -r {UP}{SIBLINGS[0]}/corpus tests/\n")
    assert len(references_outside(tmp_path)) == 2

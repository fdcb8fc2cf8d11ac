"""The benchmark harness runs end to end (tiny sizes: this checks the harness, not the speed).
It is what runs the bench README's command: ``slow`` (about 80 s), so ``.ci/run`` runs it after
the default suite."""
import json
import re
import subprocess
import sys

import pytest

from .helpers import REPO


@pytest.mark.slow
def test_bench_command_from_its_readme(tmp_path):
    (command,) = re.findall(r"```text\n(python -m bench .*?)\n```", (REPO / "bench" / "README.md").read_text())
    args = command.split()[3:]
    sizes = {"--size": "300", "--big-export": "600", "--scale": "400"}
    args = [sizes.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    args += ["--chroma-texts", "20", "--kg-triples", "500", "--skip", "concurrency", "--hub-memories", "20", "--pg-sync-size", "500",
             "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    names = [r["measurement"] for r in report["rows"]]
    assert any(n.startswith("1. migrate 300") for n in names) and any(n.startswith("5b. export 600") for n in names)
    assert any(n.startswith("1c. migrate 300 memories from one mem0") for n in names)
    hubbed = next(r for r in report["rows"] if r["measurement"].startswith("8c. import 20 memories routed"))
    assert "(hub)" in hubbed["ours"]  # beside the live hub the import really went through it
    assert any(n.startswith("9c. second sync, nothing changed, 500-drawer pgvector") for n in names)
    assert any(n.startswith("10. export 300 drawers encrypted") for n in names)
    assert any(n.startswith("4d. restore and sync vs a raw upsert of the same rows") for n in names)
    assert [n.split(".")[0] for n in names if "400" in n] == ["S1", "S2", "S3", "S4", "S5"]
    assert next(r for r in report["rows"] if r["measurement"].startswith("S4."))["ours"].endswith(", 0 moved")
    assert any(n.startswith("11. diff of two nightly bundles (3 drawers changed)") for n in names)
    assert all(r["ratio"] is None or r["ratio"] > 0 for r in report["rows"])
    assert "| measurement |" in proc.stdout

"""``palace-etl diff``: drawers added, removed and edited (word diff, metadata), KG triples added,
removed and invalidated, per wing; between bundles of one chain, replicas, or both."""
from __future__ import annotations

import shutil
from pathlib import Path

from etl.diff import MAX_DIFF_WORDS, word_diff
from palace.kg import KnowledgeGraph
from palace.layout import layout_for
from palace.vectors import VectorStore

from .helpers import cli_json, run_cli
from .test_do_no_harm import make_palace
from .test_encrypted import keypair
from .test_export import unit

ROWS = {
    "d01": ("the quick brown fox jumps over the lazy dog near the river bank at dawn", {"wing": "w1", "room": "r"}),
    "d02": ("moved to another room", {"wing": "w1", "room": "r"}),
    "d03": ("this one is forgotten", {"wing": "w1", "room": "r"}),
    **{f"d{i:02d}": (f"steady memory {i}", {"wing": "w2", "room": "s"}) for i in range(4, 40)},
}


def triple(i: str, s: str, p: str, o: str, valid_to: str | None = None) -> dict:
    return {"id": i, "subject": s, "predicate": p, "object": o, "valid_from": "2026-01-01", "valid_to": valid_to,
            "confidence": 1.0, "source_closet": None, "source_file": None, "source_drawer_id": None,
            "adapter_name": None, "extracted_at": "2026-01-01T00:00:00"}


def build(path: Path) -> Path:
    make_palace(path, ROWS)
    with KnowledgeGraph(path / "knowledge_graph.sqlite3") as kg:
        kg.replace_rows("entities", [{"id": e, "name": e.title(), "type": "person", "properties": "{}",
                                      "created_at": "2026-01-01"} for e in ("alice", "bob", "acme")])
        kg.replace_rows("triples", [triple("t1", "alice", "knows", "bob"), triple("t2", "alice", "works_at", "acme")])
    return path


def change(path: Path) -> None:
    store = VectorStore(layout_for(path))
    store.upsert(["d01", "d02", "d40"],
                 ["the quick red fox jumps over the lazy dog near the river bank at dusk", ROWS["d02"][0], "brand new"],
                 [ROWS["d01"][1], {"wing": "w1", "room": "r2"}, {"wing": "w2", "room": "s"}], unit(3, 77))
    store.delete(["d03"])
    store.close()
    with KnowledgeGraph(path / "knowledge_graph.sqlite3") as kg:
        kg.replace_rows("triples", [triple("t1", "alice", "knows", "bob", valid_to="2026-12-01"),
                                    triple("t3", "bob", "works_at", "acme")])
        kg.delete_rows("triples", ["t2"])


def ids(items: list[dict]) -> list[str]:
    return [i["id"] for i in items]


def check_changes(r: dict) -> None:
    d = r["drawers"]
    assert (ids(d["added"]), ids(d["removed"]), ids(d["edited"])) == (["d40"], ["d03"], ["d01", "d02"])
    assert d["removed"][0]["text"] == "this one is forgotten" and d["added"][0]["wing"] == "w2"
    d01, d02 = d["edited"]
    assert "[-brown-] {+red+}" in d01["text_diff"] and "[-dawn-] {+dusk+}" in d01["text_diff"]
    assert d01["metadata"] == {}
    assert d02["text_diff"] == "" and d02["metadata"] == {"room": {"a": "r", "b": "r2"}}
    t = r["triples"]
    assert (ids(t["added"]), ids(t["removed"]), ids(t["invalidated"]), t["edited"]) == (["t3"], ["t2"], ["t1"], [])
    assert t["invalidated"][0]["valid_to"] == "2026-12-01"
    assert r["wings"] == {"w1": {"added": 0, "removed": 1, "edited": 2}, "w2": {"added": 1, "removed": 0, "edited": 0}}
    assert r["rooms"] == {"w1/r": {"added": 0, "removed": 1, "edited": 1}, "w1/r2": {"added": 0, "removed": 0, "edited": 1},
                          "w2/s": {"added": 1, "removed": 0, "edited": 0}}
    assert not r["same"]


def test_diff_between_bundles_replicas_and_both(tmp_path):
    before = build(tmp_path / "before")
    after = tmp_path / "after"
    shutil.copytree(before, after)
    out = tmp_path / "b"
    full = cli_json("export", "--palace", after, "--out", out)["bundle"]
    change(after)
    incr = cli_json("export", "--palace", after, "--out", out, "--incremental")["bundle"]

    check_changes(cli_json("diff", full, incr))  # two points of one chain
    check_changes(cli_json("diff", incr))  # since the bundle before it
    first = cli_json("diff", full)  # the first bundle: everything in it is new
    assert first["counts"]["drawers"] == {"added": len(ROWS), "removed": 0, "edited": 0}
    assert first["counts"]["triples"]["added"] == 2 and first["a"].startswith("(nothing")
    assert "must be one bundle" in run_cli("diff", after, check=10).stderr
    check_changes(cli_json("diff", before, after))  # two replicas
    check_changes(cli_json("diff", full, after))  # a bundle and a replica
    assert cli_json("diff", incr, f"bundle:{out}")["same"]  # the newest bundle of the directory
    back = cli_json("diff", after, before)
    assert ids(back["drawers"]["added"]) == ["d03"] and ids(back["drawers"]["removed"]) == ["d40"]

    stat = run_cli("diff", full, incr, "--stat").stdout.splitlines()
    assert "  w1: +0 -1 ~2" in stat and "  w2: +1 -0 ~0" in stat
    text = run_cli("diff", full, incr).stdout
    assert "- d03 [w1/r] this one is forgotten" in text and "room: 'r' -> 'r2'" in text
    assert "per room: w1/r +0 -1 ~1, w1/r2 +0 -0 ~1, w2/s +1 -0 ~0" in text
    assert "x alice knows bob (until 2026-12-01)" in text


def test_diff_of_encrypted_bundles_needs_the_key_and_refuses_a_damaged_chain(tmp_path):
    key, pub = keypair(tmp_path, "me")
    palace = build(tmp_path / "palace")
    out = tmp_path / "b"
    full = cli_json("export", "--palace", palace, "--out", out, "--encrypt-to", pub)["bundle"]
    change(palace)
    incr = cli_json("export", "--palace", palace, "--out", out, "--encrypt-to", pub, "--incremental")["bundle"]
    assert "it is encrypted" in run_cli("diff", full, incr, check=1).stderr
    check_changes(cli_json("diff", full, incr, "--identity", key))

    plain = tmp_path / "p"
    first = Path(cli_json("export", "--palace", palace, "--out", plain)["bundle"])
    (first / "drawers.parquet").write_bytes(b"not what was written")
    proc = run_cli("diff", first, palace, check=None)
    assert proc.returncode != 0 and "does not verify" in proc.stderr


def test_word_diff_is_bounded_and_keeps_context():
    old = " ".join(f"w{i}" for i in range(100))
    new = old.replace("w50", "changed")
    got = word_diff(old, new)
    assert got == "... w44 w45 w46 w47 w48 w49 [-w50-] {+changed+} w51 w52 w53 w54 w55 w56 ..."
    assert word_diff("a " * (MAX_DIFF_WORDS + 1), "b") is None
    assert word_diff("same  words", "same words") == "(only whitespace changed)"

"""``python -m bench``: run every measurement with its baseline in the same run; print a markdown
table and write a JSON report. Figures are ratios against same-run baselines; absolute times are
shown but never asserted (the machine is shared and noisy)."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .generate import generate

HERE = Path(__file__).resolve().parent


def measure(name: str, **args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.measure", name, json.dumps(args)], capture_output=True,
                          text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spawn(name: str, **args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.measure", name, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE.parent)


def collect(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"bench: worker failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def rate(r: dict) -> float:
    return r["rows"] / r["seconds"] if r["seconds"] else float("inf")


def row(name, ours, base, ratio, target, ok, rss, note=""):
    return {"measurement": name, "ours": ours, "baseline": base, "ratio": ratio, "target": target,
            "pass": ok, "peak_rss_mb": rss, "note": note}


def run(size: int, chroma_texts: int, kg_triples: int, work: Path, skip: set[str], big_export: int = 0,
        hub_memories: int = 500, pg_sync_size: int = 100000, scale: tuple[int, ...] = ()) -> list[dict]:
    if "core" in skip:  # the scale rows alone (every other group builds on the core rows' palace)
        return scale_rows(work, scale)
    rows = []
    generate(work / "workload", size)
    docs = str(work / "docs.json")
    parse = measure("documents", workload=str(work / "workload"), out=docs)

    # 1. migration end to end vs the sum of its irreducible parts
    emb = measure("embed_ours", docs=docs, vectors_out=str(work / "vectors.npy"))
    up = measure("upsert_raw", docs=docs, vectors=str(work / "vectors.npy"), palace=str(work / "raw"))
    mig = measure("migrate", workload=str(work / "workload"), palace=str(work / "palace"))
    parts = emb["seconds"] + up["seconds"]
    rows.append(row(f"1. migrate {size:,} memories (parse, embed, load, KG)", f"{mig['seconds']:.1f} s",
                    f"{parts:.1f} s (embed {emb['seconds']:.1f} + raw upsert {up['seconds']:.1f})",
                    mig["seconds"] / parts, "<= 1.10", mig["seconds"] / parts <= 1.10,
                    max(mig["peak_rss_mb"], emb["peak_rss_mb"], up["peak_rss_mb"])))

    # 1b. verify the migration against its source vs re-reading the source
    vf = measure("verify_against", workload=str(work / "workload"), palace=str(work / "palace"))
    rows.append(row(f"1b. verify {size:,} drawers against their source", f"{vf['seconds']:.1f} s, "
                    f"{vf['problems']} problems", f"{parse['seconds']:.1f} s (re-reading the source)",
                    vf["seconds"] / parse["seconds"], "<= 2", vf["seconds"] / parse["seconds"] <= 2,
                    vf["peak_rss_mb"]))

    # 1c. the same memories from one mem0 export (one large JSON document, streamed)
    m0 = measure("migrate", workload=str(work / "workload"), palace=str(work / "palace-mem0"), source="mem0")
    rows.append(row(f"1c. migrate {size:,} memories from one mem0 export", f"{m0['seconds']:.1f} s",
                    f"{parts:.1f} s (the same parts as row 1)", m0["seconds"] / parts, "<= 1.10",
                    m0["seconds"] / parts <= 1.10, m0["peak_rss_mb"]))

    # 2. MemPalace's path: Chroma's default EF inside upsert, on a subset (it is slow)
    n = min(chroma_texts, size)
    ch = measure("embed_chroma_default", docs=docs, limit=n, palace=str(work / "chroma-default"))
    rows.append(row(f"2. migrate rate vs Chroma default EF in upsert ({n:,} texts)", f"{rate(mig):.1f} rows/s",
                    f"{rate(ch):.1f} rows/s", rate(mig) / rate(ch), ">= 4", rate(mig) / rate(ch) >= 4,
                    ch["peak_rss_mb"]))
    ours_n = measure("embed_ours", docs=docs, limit=n)
    rows.append(row(f"2b. embedder alone vs Chroma default EF (same {n:,} texts)", f"{rate(ours_n):.1f} texts/s",
                    f"{rate(ch):.1f} texts/s", rate(ours_n) / rate(ch), ">= 4", rate(ours_n) / rate(ch) >= 4,
                    ours_n["peak_rss_mb"]))

    # 2c. the same comparison on short memories only (one-liners and a few sentences, no paragraphs)
    short = str(work / "short.json")
    Path(short).write_bytes(json.dumps([d for d in json.loads(Path(docs).read_text()) if len(d) < 700][:n]).encode())
    ch_s = measure("embed_chroma_default", docs=short, limit=n, palace=str(work / "chroma-default-short"))
    ours_s = measure("embed_ours", docs=short, limit=n)
    rows.append(row(f"2c. embedder alone vs Chroma default EF ({n:,} short memories, < 700 chars)",
                    f"{rate(ours_s):.1f} texts/s", f"{rate(ch_s):.1f} texts/s", rate(ours_s) / rate(ch_s), ">= 4",
                    rate(ours_s) / rate(ch_s) >= 4, ours_s["peak_rss_mb"]))

    # 3. identical re-run
    again = measure("migrate", workload=str(work / "workload"), palace=str(work / "palace"))
    ok = again["drawers_written"] == 0 and again["seconds"] <= 0.05 * mig["seconds"]
    rows.append(row("3. re-run the identical import", f"{again['seconds']:.1f} s, {again['drawers_written']} written",
                    f"{mig['seconds']:.1f} s (first run)", again["seconds"] / mig["seconds"], "<= 0.05, 0 written",
                    ok, again["peak_rss_mb"]))

    # 4-5. export the migrated palace, restore it into an empty one (vectors carried)
    ex = measure("export_palace", palace=str(work / "palace"), out=str(work / "backups"))
    gp = measure("get_paging_raw", palace=str(work / "palace"))
    rows.append(row(f"5. export {size:,} drawers with vectors (bundle)", f"{rate(ex):,.0f} rows/s",
                    f"{rate(gp):,.0f} rows/s (raw get paging)", rate(ex) / rate(gp), ">= 0.8, RSS well under 1 GB",
                    rate(ex) / rate(gp) >= 0.8 and ex["peak_rss_mb"] < 1024, ex["peak_rss_mb"],
                    f"raw paging peak {gp['peak_rss_mb']:.0f} MB"))
    bundle = sorted((work / "backups").glob("palace-*"))[-1]
    rs = measure("restore_palace", bundle=str(bundle), palace=str(work / "restored"))
    rows.append(row("4. restore into an empty palace (no re-embedding)", f"{rate(rs):,.0f} rows/s",
                    f"{rate(up):,.0f} rows/s (raw upsert)", rate(rs) / rate(up), ">= 0.8",
                    rate(rs) / rate(up) >= 0.8, rs["peak_rss_mb"]))
    sy = measure("sync_palace", a=str(work / "palace"), b=str(work / "replica"))
    sy_rate = size / sy["seconds"]
    rows.append(row("4b. sync to an empty replica (vectors carried)", f"{sy_rate:,.0f} drawers/s",
                    f"{rate(up):,.0f} rows/s (raw upsert)", sy_rate / rate(up), ">= 0.9", sy_rate / rate(up) >= 0.9,
                    sy["peak_rss_mb"]))
    same = measure("upsert_same_rows_raw", source=str(work / "palace"), palace=str(work / "raw-same"))
    rows.append(row("4d. restore and sync vs a raw upsert of the same rows (every metadata key)",
                    f"restore {rate(rs):,.0f} rows/s, sync {sy_rate:,.0f} drawers/s",
                    f"{rate(same):,.0f} rows/s (raw upsert of the palace's own rows)", sy_rate / rate(same),
                    "report (ratio: the sync)", None, same["peak_rss_mb"],
                    f"restore ratio {rate(rs) / rate(same):.2f}"))
    again = measure("sync_palace", a=str(work / "palace"), b=str(work / "replica"))
    rows.append(row("4c. second sync, nothing changed", f"{again['seconds']:.1f} s, {again['rows']} moved",
                    f"{sy['seconds']:.1f} s (first sync)", again["seconds"] / sy["seconds"], "small fraction, 0 moved",
                    again["rows"] == 0 and again["seconds"] <= 0.2 * sy["seconds"], again["peak_rss_mb"]))

    # 10. the same export encrypted (age); 11. a diff of two consecutive nightly bundles
    if "bundles" not in skip:
        rows += bundles(work, size, bundle)

    # 5b. export of a big palace (built from precomputed vectors: only the export is measured)
    if big_export:
        measure("build_palace", palace=str(work / "big"), n=big_export)
        bx = measure("export_palace", palace=str(work / "big"), out=str(work / "big-backups"))
        bg = measure("get_paging_raw", palace=str(work / "big"))
        rows.append(row(f"5b. export {big_export:,} drawers with vectors (bundle)", f"{rate(bx):,.0f} rows/s",
                        f"{rate(bg):,.0f} rows/s (raw get paging)", rate(bx) / rate(bg),
                        ">= 0.8, RSS under 600 MB", rate(bx) / rate(bg) >= 0.8 and bx["peak_rss_mb"] < 600,
                        bx["peak_rss_mb"], f"raw paging peak {bg['peak_rss_mb']:.0f} MB"))

    # 6. KG bulk load vs MemPalace's add_triple loop
    kb = measure("kg_bulk", path=str(work / "kg-ours.sqlite3"), n=kg_triples)
    km = measure("kg_mempalace", path=str(work / "kg-mp.sqlite3"), n=kg_triples)
    rows.append(row(f"6. KG load of {kg_triples:,} triples vs mempalace add_triple loop", f"{rate(kb):,.0f} rows/s",
                    f"{rate(km):,.0f} rows/s", rate(kb) / rate(km), ">= 20", rate(kb) / rate(km) >= 20,
                    max(kb["peak_rss_mb"], km["peak_rss_mb"])))

    # 7. concurrency: 4 KG writers + 2 drawer upserters + a reader, one palace
    if "concurrency" not in skip:
        pal, kg = str(work / "shared"), str(work / "shared" / "knowledge_graph.sqlite3")
        measure("drawer_writer", palace=pal, tag="seed", n=200, seed=99)
        start = time.perf_counter()
        procs = [spawn("kg_writer", path=kg, tag=f"k{i}", n=500) for i in range(4)]
        procs += [spawn("drawer_writer", palace=pal, tag=f"d{i}", n=2000, seed=i, pause=1.0) for i in range(2)]
        rd = spawn("reader", palace=pal, seconds=20.0)
        res = [collect(p) for p in procs]
        wall = time.perf_counter() - start
        r = collect(rd)
        errors = sum(x["errors"] for x in res)
        total = sum(x["rows"] for x in res)
        rows.append(row("7. 4 KG writers + 2 drawer writers, one palace", f"{total / wall:,.0f} rows/s, "
                        f"{errors} errors", "-", None, "0 errors", errors == 0,
                        max(x["peak_rss_mb"] for x in res)))
        rows.append(row("7b. reader client re-creations during those writes (20 s)",
                        f"{r['client_creations']} re-creations", f"{r['naive_recreations']} (re-create on every "
                        "mtime change, as 3.3.6)", r["client_creations"] / max(1, r["naive_recreations"]),
                        "<= 1 per 5 s", r["client_creations"] <= 1 + 20 / 5, r["peak_rss_mb"]))
    if scale:
        rows += scale_rows(work, scale)
    if "live" not in skip:
        rows += live(work, docs, ex, hub_memories)
    if "pgvector" not in skip:
        rows += pgvector(work, size, emb, gp, pg_sync_size)
    return rows


def scale_rows(work: Path, sizes: tuple[int, ...]) -> list[dict]:
    """S: how each verb's cost grows with the palace: a palace of N drawers (precomputed vectors),
    its full export, the next night's incremental export of 1% changed drawers, a first sync to an
    empty replica, a second sync with nothing changed, and a parity verify of the pair."""
    out = []
    for n in sizes:
        home = work / f"scale-{n}"
        palace, backups, replica = home / "palace", home / "backups", home / "replica"
        measure("build_palace", palace=str(palace), n=n)
        full = measure("export_palace", palace=str(palace), out=str(backups))
        measure("nightly_changes", palace=str(palace), drawers=n)
        incr = measure("export_palace", palace=str(palace), out=str(backups), incremental=True)
        first = measure("sync_palace", a=str(palace), b=str(replica))
        again = measure("sync_palace", a=str(palace), b=str(replica))
        pair = measure("verify_pair", a=str(palace), b=str(replica))
        out += [
            row(f"S1. export {n:,} drawers (full bundle)", f"{full['seconds']:.1f} s", "-", None,
                "RSS < 600 MB at 100k" if n >= 100000 else "report", full["peak_rss_mb"] < 600 if n >= 100000 else None,
                full["peak_rss_mb"]),
            row(f"S2. incremental export, 1% of {n:,} changed", f"{incr['seconds']:.1f} s, {incr['rows']:,} drawers",
                f"{full['seconds']:.1f} s (full export)", incr["seconds"] / full["seconds"], "<= 0.10 at 100k",
                incr["seconds"] <= 0.1 * full["seconds"] if n >= 100000 else None, incr["peak_rss_mb"]),
            row(f"S3. first sync of {n:,} drawers to an empty replica", f"{first['seconds']:.1f} s", "-", None,
                "report", None, first["peak_rss_mb"]),
            row(f"S4. second sync of {n:,}, nothing changed", f"{again['seconds']:.1f} s, {again['rows']} moved",
                f"{first['seconds']:.1f} s (first sync)", again["seconds"] / first["seconds"], "<= 0.10 at 100k",
                again["rows"] == 0 and (again["seconds"] <= 0.1 * first["seconds"] if n >= 100000 else True),
                again["peak_rss_mb"]),
            row(f"S5. verify the pair, {n:,} drawers", f"{pair['seconds']:.1f} s, {pair['problems']} problems",
                f"{first['seconds']:.1f} s (first sync)", pair["seconds"] / first["seconds"], "report", None,
                pair["peak_rss_mb"]),
        ]
    return out


def bundles(work: Path, size: int, full: Path) -> list[dict]:
    """10: the migrated palace exported encrypted vs plain (alternated, best of two each). 11: the next night, 1% of the
    drawers changed (edits, deletes, adds): ``diff`` of the full bundle and that night's incremental
    vs re-reading both palaces' documents and metadata."""
    import shutil

    pub = measure("age_key", out=str(work / "bench.key"))["public"]
    runs = [measure("export_palace", palace=str(work / "palace"), out=str(work / f"{kind}-{k}"),
                    encrypt_to=pub if kind == "sealed" else "") for k in range(2) for kind in ("plain", "sealed")]
    plain = min(runs[0::2], key=lambda r: r["seconds"])  # alternated, best of two each: the machine is noisy
    enc = min(runs[1::2], key=lambda r: r["seconds"])
    night = work / "palace-night2"
    shutil.copytree(work / "palace", night)
    shutil.copytree(full.parent, work / "nightly")
    measure("nightly_changes", palace=str(night), drawers=size)
    incr = Path(measure("export_palace", palace=str(night), out=str(work / "nightly"), incremental=True)["bundle"])
    ours = measure("diff_points", a=str(work / "nightly" / full.name), b=str(incr))
    both = measure("read_both_raw", a=str(work / "palace"), b=str(night))
    whole = measure("diff_points", a=str(work / "palace"), b=str(night))
    return [
        row(f"10. export {size:,} drawers encrypted (age, one recipient)", f"{rate(enc):,.0f} rows/s",
            f"{rate(plain):,.0f} rows/s (the same export, plain; alternated, best of two each)",
            rate(enc) / rate(plain), ">= 0.8",
            rate(enc) / rate(plain) >= 0.8, enc["peak_rss_mb"]),
        row(f"11. diff of two nightly bundles ({ours['rows']:,} drawers changed)", f"{ours['seconds']:.2f} s",
            f"{both['seconds']:.2f} s (re-reading both palaces' documents and metadata)",
            ours["seconds"] / both["seconds"], "report", None, ours["peak_rss_mb"],
            f"diff of the two palaces themselves: {whole['seconds']:.2f} s"),
    ]


def pgvector(work: Path, size: int, emb: dict, paging: dict, big: int) -> list[dict]:
    """9. pgvector palaces on a real PostgreSQL (the ``pgserver`` wheel, started here)."""
    import pgserver

    server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="pg-")), cleanup_mode="delete")
    os.environ["MEMPALACE_PGVECTOR_DSN"] = dsn = server.get_uri()
    try:
        mv = measure("sync_palace", a=str(work / "palace"), b=f"pgvector:{work / 'pg-moved'}")
        raw = measure("copy_raw", palace=str(work / "palace"), dsn=dsn)
        pg = measure("migrate", workload=str(work / "workload"), palace=f"pgvector:{work / 'pg-imported'}")
        measure("build_palace", palace=str(work / "pg-big-src"), n=big)
        first = measure("sync_palace", a=str(work / "pg-big-src"), b=f"pgvector:{work / 'pg-big'}")
        again = measure("sync_palace", a=str(work / "pg-big-src"), b=f"pgvector:{work / 'pg-big'}")
    finally:
        os.environ.pop("MEMPALACE_PGVECTOR_DSN", None)
        server.cleanup()
    floor_s = size / rate(paging) + raw["seconds"]  # the rows must come out of Chroma before any COPY
    move = floor_s / mv["seconds"]
    floor = pg["seconds"] / emb["seconds"]
    return [
        row(f"9. move {size:,} drawers Chroma -> pgvector (vectors carried)", f"{size / mv['seconds']:,.0f} drawers/s",
            f"{size / floor_s:,.0f} rows/s (raw Chroma get paging, then a raw COPY of the same rows)", move, ">= 0.8",
            move >= 0.8, mv["peak_rss_mb"], f"the raw COPY alone: {rate(raw):,.0f} rows/s"),
        row(f"9b. migrate {size:,} memories into pgvector (parse, embed, load, KG)", f"{pg['seconds']:.1f} s",
            f"{emb['seconds']:.1f} s (embedding alone)", floor, "<= 1.15", floor <= 1.15, pg["peak_rss_mb"]),
        row(f"9c. second sync, nothing changed, {big:,}-drawer pgvector palace", f"{again['seconds']:.1f} s, "
            f"{again['rows']} moved", f"{first['seconds']:.1f} s (first sync)", again["seconds"] / first["seconds"],
            "small fraction, 0 moved", again["rows"] == 0 and again["seconds"] <= 0.2 * first["seconds"],
            again["peak_rss_mb"]),
    ]


def live(work: Path, docs: str, quiet_export: dict, n: int) -> list[dict]:
    """8. Beside a live MemPalace hub serving the migrated palace: the export, the hub's search
    latency while it runs, and an import routed through the hub."""
    palace = work / "palace"
    with Hub(palace) as url:
        idle = measure("hub_searches", url=url, docs=docs, n=60)
        stop = work / "searches.stop"
        searcher = spawn("hub_searches", url=url, docs=docs, stop_file=str(stop))
        ex = measure("export_palace", palace=str(palace), out=str(work / "live-backups"))
        stop.touch()
        busy = collect(searcher)
        texts = json.loads(Path(docs).read_text())[:n]
        source = work / "routed.jsonl"
        source.write_text("".join(json.dumps({"id": f"r{i}", "text": t, "room": "routed"}) + "\n"
                                  for i, t in enumerate(texts)))
        ours = measure("routed_import", palace=str(palace), source=str(source))
        loop = measure("add_drawer_loop", url=url, source=str(source))
    slow = quiet_export["seconds"] / ex["seconds"]
    p50, p99 = busy["p50_ms"] / idle["p50_ms"], busy["p99_ms"] / idle["p99_ms"]
    return [
        row("8. export beside a live hub (its lease held)", f"{rate(ex):,.0f} rows/s",
            f"{rate(quiet_export):,.0f} rows/s (same export, quiet palace)", slow, ">= 0.9", slow >= 0.9,
            ex["peak_rss_mb"]),
        row("8b. hub mempalace_search latency during that export", f"p50 {busy['p50_ms']:.0f} ms, p99 "
            f"{busy['p99_ms']:.0f} ms ({busy['rows']} searches)", f"idle: p50 {idle['p50_ms']:.0f} ms, p99 "
            f"{idle['p99_ms']:.0f} ms", max(p50, p99), "<= 1.2 (worse of p50, p99)", max(p50, p99) <= 1.2,
            busy["peak_rss_mb"], f"p50 ratio {p50:.2f}, p99 ratio {p99:.2f}"),
        row(f"8c. import {n:,} memories routed through the hub", f"{rate(ours):,.1f} drawers/s ({ours['route']})",
            f"{rate(loop):,.1f} drawers/s (MemPalace add_drawer loop)", rate(ours) / rate(loop), "report",
            None, ours["peak_rss_mb"]),
    ]


class Hub:
    """``mempalace serve`` on 127.0.0.1 over a palace, for the live rows."""

    def __init__(self, palace: Path):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.palace = palace

    def __enter__(self) -> str:
        import httpx

        from palace.live import lease_holder

        mempalace = str(Path(sys.executable).parent / "mempalace")
        self.log = open(self.palace.parent / "hub.log", "wb")  # a pipe nobody reads would fill and stall the hub
        self.proc = subprocess.Popen([mempalace, "serve", "--palace", str(self.palace), "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "MEMPALACE_SYNC_INTERVAL": "3600"})
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: the hub exited:\n{(self.palace.parent / 'hub.log').read_text()[-3000:]}")
            try:
                if lease_holder(self.palace) and httpx.get(f"http://127.0.0.1:{self.port}/healthz",
                                                           timeout=5).status_code == 200:
                    return f"http://127.0.0.1:{self.port}/mcp"
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("bench: the hub never started")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"palace-etl benchmark, {meta['date']}, {meta['machine']}, size {meta['size']:,}", "",
           "| measurement | ours | baseline (same run) | ratio | target | pass | peak RSS MB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        ok = {True: "yes", False: "**no**", None: "-"}[r["pass"]]
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        ours = r["ours"] if not r["note"] else f"{r['ours']} ({r['note']})"
        out.append(f"| {r['measurement']} | {ours} | {r['baseline']} | {ratio} | {r['target']} | {ok} | {rss} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--size", type=int, default=15000, help="memories to migrate (15000; 100000 for the big run)")
    ap.add_argument("--chroma-texts", type=int, default=2000, help="texts through Chroma's slow default EF")
    ap.add_argument("--kg-triples", type=int, default=20000, help="triples for the KG comparison")
    ap.add_argument("--skip", action="append", default=[],
                    help="skip a measurement group (concurrency, live, pgvector, bundles; core: every row but the scale rows)")
    ap.add_argument("--pg-sync-size", type=int, default=100000, help="drawers of the pgvector palace synced twice (9c)")
    ap.add_argument("--hub-memories", type=int, default=500, help="memories imported through the live hub (row 8c)")
    ap.add_argument("--big-export", type=int, default=0, help="also export a palace of this many drawers (100000)")
    ap.add_argument("--scale", default="", help="comma-separated palace sizes for the scale rows S1-S5 "
                    "(e.g. 15000,100000); none by default")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON/markdown report goes")
    a = ap.parse_args()
    meta = {"date": dt.date.today().isoformat(), "size": a.size,
            "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB, "
                       f"Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory(prefix="palace-etl-bench-") as tmp:
        rows = run(a.size, a.chroma_texts, a.kg_triples, Path(tmp), set(a.skip), a.big_export, a.hub_memories,
                   a.pg_sync_size, tuple(int(n) for n in a.scale.split(",") if n))
    md = markdown(rows, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (a.out / "latest.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

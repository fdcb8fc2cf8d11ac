"""Rendering of results for people (stderr/stdout text) and scripts (one JSON object)."""
from __future__ import annotations

import sys

import orjson
import typer

from ..runs import DONE


def emit_json(obj: dict) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")


def import_report(r: dict) -> None:
    verb = "would write" if r["dry_run"] else "wrote"
    typer.echo(f"{r['importer']} {r['source']} -> {r['palace']}")
    if r["route"] != "direct":
        typer.echo(f"  route: {r['route']} (a live MemPalace holds the palace); it cannot carry: "
                   + "; ".join(r["route_drops"]))
    for note in r.get("route_notes") or ():
        typer.echo(f"  put right: {note}")
    typer.echo(f"  drawers: {r['drawers_read']} read, {verb} {r['drawers_written']}, "
               f"{r['drawers_unchanged']} unchanged, {r['drawers_duplicate']} duplicate in source")
    typer.echo(f"  vectors: {r['vectors_embedded']} embedded, {r['vectors_carried']} carried "
               f"({r['embedder']}; {r['vector_decision']})")
    typer.echo(f"  knowledge graph: {r['entities_read']} entities, {r['triples_read']} triples read, "
               f"{r['kg_rows_written']} rows written")
    if r.get("resume_refused"):
        typer.echo(f"  not resumed: {r['resume_refused']}")
    if r["batches_resumed"]:
        typer.echo(f"  resumed: {r['batches_resumed']} batches ({r['rows_resumed']} rows) already committed")
    for wing, rooms in sorted(r["per_room"].items()):
        typer.echo(f"  wing {wing}: " + ", ".join(f"{room} {n}" for room, n in sorted(rooms.items())))
    if r.get("skipped"):
        typer.echo("  skipped on purpose: " + ", ".join(f"{n} {why}" for why, n in sorted(r["skipped"].items())))
    if r["quarantined"]:
        typer.echo(f"  quarantined: {r['quarantined']} records"
                   + (f" -> {r['quarantine_file']}" if r["quarantine_file"] else ""))
        for line in r["quarantine_first"][:5]:
            typer.echo(f"    {line}")
    typer.echo(f"  {r['seconds']:.1f}s" + (" (dry run: nothing written)" if r["dry_run"] else ""))


def status_report(s: dict) -> None:
    typer.echo(f"palace {s['palace']}: {s['drawers']} drawers, embedder {s['embedder'] or 'not recorded'}")
    for wing, rooms in sorted(s["wings"].items()):
        typer.echo(f"  wing {wing} ({sum(rooms.values())})")
        for room, n in sorted(rooms.items()):
            typer.echo(f"    {room:<30} {n}")
    kg = s["kg"]
    typer.echo(f"knowledge graph {kg['path']}: {kg.get('entities', 0)} entities, {kg.get('triples', 0)} triples "
               f"({kg.get('current_triples', 0)} current)")
    if s.get("probes"):
        typer.echo(f"self-query: {s['self_hit_rate']:.4f} of {s['probes']} drawers rank themselves first"
                   + (f" ({s['unreached']} not reached by the graph search, vector intact)" if s.get("unreached") else ""))
    for run in s["runs"]:
        if run["status"] not in DONE:
            typer.echo(f"  run {run['run_id']} ({run['importer']} {run['source']}) is {run['status']}: "
                       f"re-run the same import to resume")


def verify_report(v: dict) -> None:
    for f in v["findings"]:
        typer.echo(f"{f['severity']}: {f['code']}: {f['message']}", err=True)
        if f.get("remedy"):
            typer.echo(f"  fix: {f['remedy']}", err=True)
    for item in v["not_checked"]:
        typer.echo(f"not checked: {item}", err=True)
    t = v["totals"]
    unreached = f"; {t['unreached']} not reached by the graph search, vector intact" if t.get("unreached") else ""
    typer.echo(f"checked {t['drawers']} drawers, {t['probes']} retrieval probes "
               f"(self-hit rate {t['self_hit_rate']:.4f}{unreached}), {t['triples']} triples", err=True)
    typer.echo("no problems found" if not v["findings"] else f"{len(v['findings'])} problem(s) found", err=True)


def export_report(r: dict) -> None:
    if r.get("format", "parquet") != "parquet":
        typer.echo(f"exported {r.get('drawers', 0)} drawers as {r['format']} to {r['out']}")
        return
    what = ", ".join(f"{n} {t}" for t, n in sorted(r["counts"].items()) if n)
    where = "would write" if r["dry_run"] else f"wrote {r['bundle']}"
    typer.echo(f"{r['kind']} bundle: {where} ({what or 'no changes'}; {r['deleted']} deletions)")
    for name in r["removed_by_retention"]:
        typer.echo(f"  retention: {'would remove' if r['dry_run'] else 'removed'} {name}")
    for table, n in sorted((r.get("vanished") or {}).items()):
        typer.echo(f"  {n} {table} were deleted by another writer during the export (recorded, not exported)")
    if r.get("rehashed_because"):
        typer.echo(f"  every row re-read to find the changes: {r['rehashed_because']}")


def export_warnings(r: dict) -> None:
    """What a cron job must hear even with --quiet (on stderr, which cron mails)."""
    if r.get("full_because"):
        typer.echo(f"palace-etl: warning: {r['full_because']}", err=True)
    if r.get("named_after"):
        typer.echo(f"palace-etl: warning: {r['named_after']}; check this machine's clock", err=True)
    if r.get("others"):
        typer.echo(f"palace-etl: warning: the --out directory also holds {len(r['others'])} bundle(s) of another "
                   f"palace, wing, machine or sync replica (newest {r['others'][-1]}); this export neither chains "
                   "onto nor removes them: give each palace, and each sync replica, its own directory", err=True)


def sync_report(r: dict) -> None:
    typer.echo(f"sync {r['a']} <-> {r['b']}" + (" (dry run)" if r["dry_run"] else ""))
    labels = {"to_a": "to A", "to_b": "to B", "delete_a": "delete in A", "delete_b": "delete in B",
              "keep_both": "kept both"}
    for key, tables in r["plan"].items():
        if tables:
            typer.echo(f"  {labels[key]}: " + ", ".join(f"{n} {t}" for t, n in sorted(tables.items())))
    for c in r["conflicts"][:20]:
        typer.echo(f"  conflict {c['table']} {c['id']}: {c['winner'].upper()} wins ({c['rule']})")
    if len(r["conflicts"]) > 20:
        typer.echo(f"  ... {len(r['conflicts']) - 20} more conflicts (see --json)")
    for side, why in sorted(r.get("rehashed", {}).items()):
        typer.echo(f"  {side.upper()}: every row re-read to find the changes: {why}")
    for side, why in sorted(r.get("went_back", {}).items()):
        typer.echo(f"  {side.upper()}: no deletion inferred from it: {why}")
    if r["dry_run"]:
        return
    for line in r.get("scrubbed", []):  # a forget carried here: what was scrubbed, and what could not be
        typer.echo(f"  scrubbed: {line}")
    if r["converged"]:
        typer.echo(f"  converged: both replicas hold the same content ({r['moved']} rows moved, {r['seconds']:.1f}s)")
    else:
        for t, d in r["differences"].items():
            typer.echo(f"  still different: {d['count']} {t}, e.g. {', '.join(d['first'][:3])}")


def diff_stat(r: dict) -> None:
    typer.echo(f"{r['a']} -> {r['b']}")
    for wing, n in r["wings"].items():
        typer.echo(f"  {wing}: +{n['added']} -{n['removed']} ~{n['edited']}")
    c = r["counts"]
    typer.echo(f"  drawers +{c['drawers']['added']} -{c['drawers']['removed']} ~{c['drawers']['edited']}, "
               f"closets +{c['closets']['added']} -{c['closets']['removed']} ~{c['closets']['edited']}, "
               f"triples +{c['triples']['added']} -{c['triples']['removed']} "
               f"invalidated {c['triples']['invalidated']}, entities +{c['entities']['added']} "
               f"-{c['entities']['removed']}" + (" (the same)" if r["same"] else ""))


def diff_report(r: dict, limit: int) -> None:
    diff_stat(r)
    if r["rooms"]:
        typer.echo("  per room: " + ", ".join(f"{room} +{n['added']} -{n['removed']} ~{n['edited']}"
                                             for room, n in r["rooms"].items()))

    def some(items: list, line) -> None:
        for it in items[:limit]:
            typer.echo(line(it))
        if len(items) > limit:
            typer.echo(f"    ... and {len(items) - limit} more (--json lists all)")

    for table in ("drawers", "closets"):
        part = r[table]
        if part["added"]:
            typer.echo(f"  {table} added:")
            some(part["added"], lambda d: f"    + {d['id']} [{d['wing']}/{d['room']}] {d['text']}")
        if part["removed"]:
            typer.echo(f"  {table} removed:")
            some(part["removed"], lambda d: f"    - {d['id']} [{d['wing']}/{d['room']}] {d['text']}")
        if part["edited"]:
            typer.echo(f"  {table} edited:")
            for d in part["edited"][:limit]:
                typer.echo(f"    ~ {d['id']} [{d['wing']}/{d['room']}]")
                if d["text_diff"] is None:
                    typer.echo("      text changed (too long for a word diff)")
                elif d["text_diff"]:
                    typer.echo(f"      {d['text_diff']}")
                for k, v in d["metadata"].items():
                    typer.echo(f"      {k}: {v['a']!r} -> {v['b']!r}")
            if len(part["edited"]) > limit:
                typer.echo(f"    ... and {len(part['edited']) - limit} more (--json lists all)")
    t = r["triples"]
    for what, mark in (("added", "+"), ("removed", "-"), ("invalidated", "x")):
        if t[what]:
            typer.echo(f"  triples {what}:")
            some(t[what], lambda x, m=mark: f"    {m} {x['subject']} {x['predicate']} {x['object']}"
                 + (f" (until {x['valid_to']})" if x["valid_to"] else ""))


def forget_report(r: dict) -> None:
    verb = "would erase" if r["dry_run"] else "erased"
    counts = ", ".join(f"{n} {t}" for t, n in sorted(r["counts"].items())) or "nothing"
    typer.echo(f"forget in {r['palace']}: {verb} {counts}"
               + (f" ({r['resumed']} left by an interrupted forget)" if r["resumed"] else ""))
    for d in r["bundle_dirs"]:
        typer.echo(f"  bundles: {d}")
    for line in r["receipt"]:
        typer.echo(f"  {line}")
    for a in r["kept_aside"]:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(a["counts"].items())) or "nothing"
        typer.echo(f"  kept aside by a restore: {a['palace']}: {verb} {counts}")
    for d in r["unreached"]:
        typer.echo(f"  warning: {d} (exported to from here) was not found; its bundles were not rewritten", err=True)
    for a in r["aside_unreached"]:
        typer.echo(f"  warning: {a} (kept aside by a restore) was not reached: it may hold these memories", err=True)
    for u in r["unscrubbed"]:
        typer.echo(f"  warning: {u['bundle']} could not be rewritten and may still hold these memories ({u['why']}); "
                   "the forget stays pending: re-run `palace-etl forget` once it is repaired", err=True)
    if r["dry_run"]:
        typer.echo("  (dry run: nothing changed)")

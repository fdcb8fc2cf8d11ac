"""A deterministic workload of realistic memories (fixed seed).

Texts range from one line to a few paragraphs (about 40% one-liners, 40% a few
sentences, 20% paragraphs), spread over 15 wings with their rooms, with
timestamps, plus a KG of entities and triples. Written in importer formats so
the real import path is measured: one MCP memory JSONL file per wing (the wing
is given to the importer with ``--wing``) and one mem0 ``{"results": [...]}``
JSON file.
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from pathlib import Path

import orjson

WINGS = ["billing", "platform", "mobile", "data", "infra", "security", "design", "research", "support",
         "hiring", "finance", "legal", "marketing", "personal", "home"]
ROOMS = ["decisions", "incidents", "meetings", "people", "howto", "ideas", "reviews", "planning"]
PEOPLE = ["Alice Chen", "Bob Okafor", "Chloé Martin", "Jürgen Weiß", "Priya Raman", "Maxim Petrov", "Sara Lind",
          "Tomás Ruiz", "Yuki Tanaka", "Omar Haddad", "Lena Vogel", "Ravi Iyer"]
TOOLS = ["Postgres", "ChromaDB", "SQLite", "Redis", "Kafka", "Terraform", "Grafana", "DuckDB", "Parquet", "nginx",
         "FastAPI", "React Native", "Expo", "Stripe", "S3", "rsync", "cron", "systemd"]
VERBS = ["migrated", "reviewed", "rolled back", "benchmarked", "documented", "deprecated", "upgraded", "debugged",
         "profiled", "sharded", "archived", "tuned", "load-tested", "patched"]
WHY = ["because the nightly job kept timing out", "after the incident on the home server",
       "to cut the p99 latency in half", "since the old version is end of life", "so that deletes sync everywhere",
       "because three machines write at once", "to keep vectors compatible with MemPalace",
       "after customers reported delayed invoices", "to make restores testable every month"]
FOLLOW = ["Next step: measure again after the upgrade.", "Owner will report back on Friday.",
          "Decision recorded in the ADR log.", "Rollback plan: restore last night's bundle.",
          "Open question: do we need a second replica?", "The runbook now has a section on this.",
          "Blocked on the security review.", "Nobody objected in the weekly sync."]


@dataclass
class Workload:
    mcp_files: list[Path]  # one per wing
    mem0_file: Path
    memories: int
    texts: list[str]  # every memory's text, in file order
    triples: int


def _sentence(r: random.Random) -> str:
    return (f"{r.choice(PEOPLE)} {r.choice(VERBS)} {r.choice(TOOLS)} for the {r.choice(ROOMS)} work "
            f"{r.choice(WHY)}.")


def _text(r: random.Random) -> str:
    roll = r.random()
    if roll < 0.4:
        return _sentence(r)
    n = r.randint(2, 6) if roll < 0.8 else r.randint(8, 20)
    parts = [_sentence(r) if i % 3 else r.choice(FOLLOW) for i in range(n)]
    if roll >= 0.8:  # paragraphs
        return "\n\n".join(" ".join(parts[i:i + 4]) for i in range(0, len(parts), 4))
    return " ".join(parts)


def generate(out: Path, size: int, seed: int = 20261124) -> Workload:
    r = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    per_wing: dict[str, list[bytes]] = {w: [] for w in WINGS}
    mem0, texts, triples = [], [], 0
    i = 0
    while i < size:
        wing = WINGS[i % len(WINGS)]
        room = r.choice(ROOMS)
        name = f"{wing} {room} topic {i // 7}"
        obs = []
        for _ in range(min(r.randint(1, 6), size - i)):
            t = f"{_text(r)} (memory {i})"
            obs.append(t)
            texts.append(t)
            ts = start + dt.timedelta(minutes=37 * i)
            mem0.append({"id": f"m-{i:07d}", "memory": t, "user_id": wing, "categories": [room],
                         "created_at": ts.isoformat(), "updated_at": ts.isoformat(),
                         "metadata": {"seq": i}})
            i += 1
        per_wing[wing].append(orjson.dumps({"type": "entity", "name": name, "entityType": room, "observations": obs}))
        for _ in range(r.randint(0, 2)):
            per_wing[wing].append(orjson.dumps({"type": "relation", "from": name, "to": r.choice(PEOPLE + TOOLS),
                                                "relationType": r.choice(["owned by", "depends on", "mentions"])}))
            triples += 1
    files = []
    for wing, lines in per_wing.items():
        p = out / f"mcp-{wing}.jsonl"
        p.write_bytes(b"\n".join(lines))
        files.append(p)
    mem0_file = out / "mem0.json"
    mem0_file.write_bytes(orjson.dumps({"results": mem0}))
    return Workload(files, mem0_file, size, texts, triples)

"""Comparing the times rows carry, as instants.

MemPalace writes ``filed_at`` / ``last_modified`` as naive local time (``datetime.now()``), the KG's
``CURRENT_TIMESTAMP`` is UTC with a space, and sources carry offsets (``-07:00``) or epoch seconds.
Compared as text, a conflict between two machines would be settled by their time zones. Here every
stamp becomes a UTC instant: an explicit offset is used as given; a naive KG stamp is UTC; a naive
drawer stamp is local time of the replica that holds it, whose zone palace-etl records in
``<state>/replica.json`` the first time it writes there (else the zone of the machine running sync).
Rows that travelled from a replica in another zone keep their naive text, so they are read in the
zone of the replica holding them: an error of at most the zones' difference, for those rows only.
"""
from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from .layout import atomic_write

REPLICA_FILE = "replica.json"
UTC = dt.timezone.utc
_EPOCH = re.compile(r"\d{9,}(\.\d+)?")


def local_zone_name() -> str:
    """This process's IANA zone (``TZ``, else /etc/localtime), or a fixed offset like ``UTC+02:00``."""
    tz = os.environ.get("TZ", "").lstrip(":")
    candidates = [tz] if tz else []
    try:
        link = os.readlink("/etc/localtime")
        candidates.append(link.split("zoneinfo/", 1)[1] if "zoneinfo/" in link else "")
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                ZoneInfo(name)
                return name
            except (ZoneInfoNotFoundError, ValueError):
                continue
    off = dt.datetime.now().astimezone().utcoffset() or dt.timedelta(0)
    sign, secs = ("+" if off >= dt.timedelta(0) else "-"), abs(int(off.total_seconds()))
    return f"UTC{sign}{secs // 3600:02d}:{secs % 3600 // 60:02d}"


def zone(name: str | None) -> dt.tzinfo:
    """A zone from its recorded name (IANA or ``UTC±HH:MM``); this process's zone for None."""
    name = name or local_zone_name()
    m = re.fullmatch(r"UTC([+-])(\d\d):(\d\d)", name)
    if m:
        delta = dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
        return dt.timezone(delta if m.group(1) == "+" else -delta)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # a zone this machine does not know: read it as ours
        return zone(local_zone_name())  # always a known zone or a fixed offset


def record_zone(state_dir: Path) -> None:
    """Remember the zone naive stamps written here are in (the first writer's, kept after)."""
    path = Path(state_dir) / REPLICA_FILE
    if not path.exists():
        atomic_write(path, orjson.dumps({"timezone": local_zone_name()}))


def recorded_zone(state_dir: Path | None) -> dt.tzinfo:
    try:
        name = orjson.loads((Path(state_dir) / REPLICA_FILE).read_bytes()).get("timezone") if state_dir else None
    except (OSError, orjson.JSONDecodeError, AttributeError):
        name = None
    return zone(name)


def instant(value, naive_zone: dt.tzinfo) -> float | None:
    """Seconds since the epoch for a stamp (ISO with or without offset, space or ``T``, ``Z``, epoch
    seconds); None when it is not one."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if _EPOCH.fullmatch(text):
        return float(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=naive_zone)
    return when.timestamp()


def now_utc() -> str:
    return dt.datetime.now(UTC).isoformat(timespec="microseconds")

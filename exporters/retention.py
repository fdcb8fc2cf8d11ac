"""Retention for a backup directory: keep the newest N bundles, or D daily and W weekly ones.

A bundle that a kept incremental builds on is always kept too, so nothing kept
becomes unrestorable. When a kept incremental's chain cannot be read (a link damaged
or missing), every bundle older than it is kept: once the link is repaired, any of
them may be in that chain. An export applies retention to its own bundles only:
another palace's, wing's, machine's or sync replica's in the same directory are
never removed, nor anything of ours they build on.
"""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from palace.bundles import Owner, chain, list_bundles
from palace.manifest import NAME_RE, BundleError, Manifest, bundle_time


def _readable(bundle: Path) -> bool:
    try:
        Manifest.load(bundle)
        return True
    except BundleError:
        return False


def _when(bundle: Path) -> dt.datetime:
    return bundle_time(bundle.name)


def select(bundles: list[Path], keep: int | None = None, daily: int | None = None,
           weekly: int | None = None, others: list[Path] = ()) -> set[Path]:
    """The bundles to keep (with everything they depend on). ``others`` are the directory's other
    bundles (another palace's, wing's, machine's or sync replica's): never candidates, but what they build on
    is kept (a sync replica's first bundle chains onto the export it started from)."""
    newest_first = sorted(bundles, key=_when, reverse=True)
    chosen: set[Path] = set(newest_first[:keep]) if keep else set()
    for count, key in ((daily, lambda d: d.date()), (weekly, lambda d: d.isocalendar()[:2])):
        if count:
            periods: dict = {}
            for b in newest_first:
                periods.setdefault(key(_when(b)), b)  # the newest bundle of each period
            chosen |= set(list(periods.values())[:count])
    if not (keep or daily or weekly):
        chosen = set(bundles)
    every = [*bundles, *others]
    needed: set[Path] = set()
    for b in sorted({*chosen, *others}, key=_when, reverse=True):  # newest first: a chain read once covers its links
        if b in needed:
            continue
        try:
            needed |= set(chain(b))
        except BundleError:  # its chain cannot be read: an incremental's may hold any older bundle
            needed.add(b)
            if NAME_RE.fullmatch(b.name).group(2) != "full":  # (a manifest's kind must match its name)
                needed |= {o for o in every if _when(o) < _when(b)}
    return (chosen | needed) & set(bundles)


def apply_retention(out: Path, owner: Owner, keep: int | None = None, daily: int | None = None,
                    weekly: int | None = None, dry_run: bool = False) -> list[str]:
    """Delete ``owner``'s bundles not selected; return their names. Only those are counted and
    removed: the rest are others' backups, and what they build on stays."""
    bundles, others = owner.split(list_bundles(Path(out)))
    kept = select(bundles, keep, daily, weekly, others=others)
    removed = [b for b in bundles if b not in kept and _readable(b)]  # an unreadable bundle is never removed
    if not dry_run:
        for b in removed:
            shutil.rmtree(b)
    return [b.name for b in removed]

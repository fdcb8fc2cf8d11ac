"""``palace-etl export``: one call that writes a bundle (or a human export) and applies retention."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from palace.bundles import Owner
from palace.crypt import Sealer
from palace.errors import PalaceEtlError
from palace.stores import PalaceStore

from .bundle import export_bundle
from .human import export_human
from .retention import apply_retention

FORMATS = ("parquet", "jsonl", "markdown")


def run_export(store: PalaceStore, out: Path, fmt: str = "parquet", incremental: bool = False,
               full_every: int = 7, keep: int | None = None, keep_daily: int | None = None,
               keep_weekly: int | None = None, dry_run: bool = False, wing: str | None = None,
               sealer: Sealer | None = None, host: str | None = None) -> dict:
    if fmt not in FORMATS:
        raise PalaceEtlError(f"export --format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt != "parquet":
        if incremental or keep or keep_daily or keep_weekly or wing or sealer or host:
            raise PalaceEtlError(f"export --format {fmt}: --incremental, retention, --wing, --host and encryption "
                                 "apply to bundles only")
        if dry_run:
            return {"format": fmt, "out": str(out), "dry_run": True}
        return export_human(store, out, fmt)
    report = asdict(export_bundle(store, out, incremental, full_every, dry_run, wing, sealer, host))
    report["deleted"] = len(report["deleted"])
    report["removed_by_retention"] = apply_retention(out, Owner(store.name, wing, host), keep, keep_daily,
                                                     keep_weekly, dry_run) \
        if (keep or keep_daily or keep_weekly) else []
    report["format"] = fmt
    return report

"""``palace-etl migrate SRC DST``: move a palace to another store kind (a Chroma directory to
PostgreSQL and back, into a bundle directory...) in one command: a sync into an empty target (rows,
vectors carried, never re-embedded; the KG and the embedder identity with them), then a parity
verify of the two sides, vectors compared by cosine."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from palace.crypt import Keys
from palace.errors import PalaceEtlError
from palace.stores import open_store, store_root

from .sync import run_sync
from .verify import verify_parity


@dataclass
class MigrateReport:
    source: str
    target: str
    dry_run: bool
    sync: dict
    verify: dict | None

    def to_dict(self) -> dict:
        return asdict(self)


def run_migrate(source: str, target: str, kg_source: Path | None = None, kg_target: Path | None = None,
                dry_run: bool = False, lock_timeout: float = 30.0, probes: int = 200,
                keys: Keys | None = None) -> MigrateReport:
    """Copy ``source`` into the empty ``target``, then verify they match; ``source`` is only read."""
    if store_root(source) == store_root(target):
        raise PalaceEtlError(f"migrate {source} {target}: both name the same directory; nothing written",
                             hint="give the target a new place")
    dst = open_store(target, kg_target, lock_timeout, read_only=True, keys=keys)
    try:
        if not dst.is_empty():
            raise PalaceEtlError(f"migrate into {dst.name}: it already holds a palace; nothing written",
                                 hint=f"migrate into a new place, or bring the two together with palace-etl sync "
                                      f"{source} {target}")
    finally:
        dst.close()
    moved = run_sync(source, target, kg_source, kg_target, dry_run=dry_run, max_delete=0,
                     lock_timeout=lock_timeout, keys=keys).to_dict()
    checked = None if dry_run else verify_parity(source, target, kg_source, kg_target, probes=probes,
                                                 keys=keys).to_dict()
    return MigrateReport(source, target, dry_run, moved, checked)

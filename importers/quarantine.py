"""Quarantine: records an importer could not parse, kept with file, line and cause.

Unparseable records go to ``<state_dir>/quarantine/<run_id>.jsonl``; the rest of the run imports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from palace.errors import SourceFormatError
from palace.layout import open_private, private_dir


@dataclass
class Quarantine:
    """Collects records that could not be parsed; writes them to a file unless it is a dry run.

    Nothing is written until ``activate()``: the loader calls it once the source has shown it holds
    at least one good record, so a file that is not the format at all creates nothing. Up to
    ``PENDING_MAX`` records wait in memory before that; past it the file is opened anyway."""

    path: Path | None = None
    count: int = 0
    first: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # records left out on purpose, by reason
    _fh: object = None
    _pending: list[bytes] = field(default_factory=list)
    _active: bool = False
    created: list[Path] = field(default_factory=list)  # what activate() made (for clean-up on refusal)

    PENDING_MAX = 1000

    def skip(self, reason: str, n: int = 1) -> None:
        """Count records an importer leaves out on purpose (tool definitions, deleted memories, ...)."""
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def add(self, error: SourceFormatError, raw: str | bytes | None = None) -> None:
        self.count += 1
        if len(self.first) < 20:
            self.first.append(str(error))
        if self.path is None:
            return
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        line = orjson.dumps({"file": error.path, "line": error.line, "error": error.cause, "raw": raw}) + b"\n"
        if not self._active and len(self._pending) < self.PENDING_MAX:
            self._pending.append(line)
            return
        self.activate()
        self._write(line)

    def activate(self) -> None:
        """From now on records go to the file (pending ones first)."""
        if self._active or self.path is None:
            self._active = True
            return
        self._active = True
        for line in self._pending:
            self._write(line)
        self._pending = []

    def _write(self, line: bytes) -> None:
        if self._fh is None:
            for d in (self.path.parent.parent, self.path.parent):
                if not d.exists():
                    self.created.append(d)
                private_dir(d)
            self.created.append(self.path)
            self._fh = open_private(self.path, append=False)  # a run re-parses its source from the start
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def discard(self) -> None:
        """Remove what this quarantine created (its file, and directories it made if left empty)."""
        self.close()
        for p in reversed(self.created):
            try:
                p.rmdir() if p.is_dir() else p.unlink()
            except OSError:
                pass
        self.created = []

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

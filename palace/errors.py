"""The exception hierarchy: every error palace-etl raises on purpose names its situation.

Domain code raises these; exactly one place (``etl.cli.app``) turns them into a message and an
exit code, by the mapping in ``etl.errors``.
"""
from __future__ import annotations

from pathlib import Path


class PalaceEtlError(Exception):
    """Base of every error palace-etl raises on purpose."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class SourceMissing(PalaceEtlError):
    """A source or target that should exist does not."""


class SourceFormatError(PalaceEtlError):
    """A record of a source could not be parsed; carries file and line/record."""

    def __init__(self, path: str | Path, line: int | None, cause: str, hint: str | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {cause}", hint)
        self.path = str(path)
        self.line = line
        self.cause = cause


class CollectionMissing(PalaceEtlError):
    """The palace has no such collection (yet)."""


class SchemaError(PalaceEtlError):
    """A batch does not conform to the canonical Arrow schema."""


class PalaceLocked(PalaceEtlError):
    """Another process holds the palace (or backup directory) lock."""


class EmbedderMismatch(PalaceEtlError):
    """Vectors of another model or dimension would be written into a palace."""


class ModelNotInstalled(PalaceEtlError):
    hint = "run `palace-etl model install`"


class DiskFull(PalaceEtlError):
    """Not enough free space to write safely; stopped before writing (re-run resumes)."""

    hint = "free space on that disk, then re-run the same command: it resumes after the last committed batch"


def is_disk_full(exc: BaseException) -> bool:
    """An error that is the disk being full, whichever layer raised it (OS, SQLite, Chroma)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "database or disk is full", "disk quota exceeded"))


class VerificationFailed(PalaceEtlError):
    """A check found problems (verify findings, a sync that did not converge)."""

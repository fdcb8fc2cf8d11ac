"""Exit codes, and the one mapping from exceptions to them (used by ``etl.cli.app.main``).

The exceptions themselves live on the ground floor, ``palace.errors``.
"""
from __future__ import annotations

from palace.errors import PalaceLocked, SourceMissing, VerificationFailed

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3  # run committed, some records quarantined; a forget left bundles it could not rewrite
EXIT_VERIFY_FAILED = 4
EXIT_MISSING = 10  # source or target missing
EXIT_LOCKED = 11
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 error, 2 usage, 3 partial (records quarantined, run committed; forget: bundles "
    "not rewritten), "
    "4 verification found problems, 10 source/target missing, 11 palace locked, 130 interrupted."
)

_CODES = ((SourceMissing, EXIT_MISSING), (PalaceLocked, EXIT_LOCKED), (VerificationFailed, EXIT_VERIFY_FAILED))


def exit_code(exc: BaseException) -> int:
    """The exit code for an exception palace-etl raised on purpose (1 for any other error)."""
    return next((code for cls, code in _CODES if isinstance(exc, cls)), EXIT_ERROR)

"""The error hierarchy and exit codes live on the ground floor (``palace.errors``), where the
palace core raises them; this module is the name the rest of the project imports them by."""
from palace.errors import (  # noqa: F401
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_MISSING,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    DiskFull,
    EmbedderMismatch,
    ModelNotInstalled,
    PalaceEtlError,
    PalaceLocked,
    SchemaError,
    SourceFormatError,
    SourceMissing,
    VerificationFailed,
    is_disk_full,
)

"""An embedder's identity as MemPalace 3.11 records it in ``mempalace_embedder.json``:
``model_name`` and ``dimension``."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import EmbedderMismatch


@dataclass(frozen=True)
class EmbedderIdentity:
    model_name: str
    dimension: int

    def __str__(self) -> str:
        return f"{self.model_name}/{self.dimension}"


def check_identity(palace: EmbedderIdentity | None, vectors: EmbedderIdentity) -> None:
    """Refuse vectors whose model or dimension differ from the palace's recorded identity."""
    if palace is None:
        return
    if palace.model_name != vectors.model_name or (palace.dimension and vectors.dimension
                                                   and palace.dimension != vectors.dimension):
        raise EmbedderMismatch(
            f"write vectors: palace was built with embedder {palace}, these vectors are {vectors}",
            hint="re-embed with the palace's embedder (`--embedder`), or import into a new palace",
        )

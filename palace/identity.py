"""An embedder's identity as MemPalace 3.11 records it in ``mempalace_embedder.json``:
``model_name`` and ``dimension``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbedderIdentity:
    model_name: str
    dimension: int

    def __str__(self) -> str:
        return f"{self.model_name}/{self.dimension}"

"""A ``chroma run`` server (``http://host:port``), with the KG file and sidecar kept beside ``--kg``.

Its API is all there is: snapshot and rows page ``get`` (documents and metadata, no vectors),
and the server serialises writers itself, so there is no palace lock and no session lock. (MemPalace
3.11 cannot serve such a palace -- its Chroma backend opens only a PersistentClient -- so this store
exists to move palaces off and onto such servers.)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from ..errors import PalaceEtlError
from ..rows import COLLECTIONS, paged
from .base import READ_PAGE, CollectionInfo, Page
from .chroma import ChromaStore


class ChromaServerStore(ChromaStore):
    def scrub(self, forgotten: dict[str, set[str]]) -> list[str]:
        return [*super().scrub(forgotten), f"{self.name}: the Chroma server's own files were not scrubbed "
                "(run `chroma vacuum` where it keeps them, with the server stopped)"]

    kind = "chroma-server"
    root = None  # its files are on the server's host

    def exists(self) -> bool:
        return self.info("drawers") is not None

    def verified(self, whole: bool = True) -> None:
        pass

    def _open(self, table: str):
        """The collection, or None when the server does not have it."""
        store = self._existing(table)
        return None if store is None else store.reading()

    def _collection_rows(self, table: str, fields: tuple[str, ...] | None) -> Iterator[Page]:
        if self._open(table) is None:
            return
        include = ["documents", "metadatas"] if fields is None else \
            [*(["documents"] if "document" in fields else []), *(["metadatas"] if set(fields) - {"document"} else [])]
        keep = None if fields is None else set(fields) - {"document"}
        rows = ((i, d, (m or {}) if keep is None else {k: v for k, v in (m or {}).items() if k in keep})
                for _, i, d, m in self._collection(table).scan(include, READ_PAGE))
        yield from paged(rows, READ_PAGE)

    def info(self, table: str) -> CollectionInfo | None:
        col = self._open(table)
        if col is None:
            return None
        first = col.get(limit=1, include=["embeddings"])["embeddings"]
        return CollectionInfo(col.count(), len(first[0]) if len(first) else None, dict(col.metadata or {}))

    def counts(self) -> dict[str, int]:
        return {t: (info.count if (info := self.info(t)) else 0) for t in COLLECTIONS} | self._kg_counts()

    def integrity(self, full: bool) -> list:
        """The KG file here; the server's own files are on the server's host (not checked)."""
        return [(self.name, None)] + self._kg_integrity(self.kg_path, full)

    def session(self, exclusive: bool, timeout: float):
        return contextlib.nullcontext()

    def replacing(self, force: bool, timeout: float, check, settings: dict | None = None) -> "_InPlace":
        """A server's data cannot be built aside and renamed: it must be empty, and is written in place."""
        if force:
            raise PalaceEtlError(f"restore into {self.name}: --force cannot replace a server's palace",
                                 hint="start an empty chroma server (and an empty --kg) and restore into it")
        if not self.is_empty():
            raise PalaceEtlError(f"restore into {self.name}: it already holds a palace",
                                 hint="start an empty chroma server (and an empty --kg) and restore into it")
        self.settings = settings or {}
        self.close()  # collections are created with these settings on the first write
        return _InPlace(self, check)

    def check_target(self) -> None:
        pass

    def is_empty(self) -> bool:
        return not self.kg_path.exists() and not any(n for t, n in self.counts().items() if t in COLLECTIONS)


class _InPlace:
    recovered = None
    replaced = None

    def __init__(self, store: ChromaServerStore, check):
        self.target, self.check = store, check

    def __enter__(self) -> "_InPlace":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.check(self.target)

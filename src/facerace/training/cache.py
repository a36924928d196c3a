"""An on-disk embedding cache: SQLite, one row per (pipeline, image content hash).

Each batch is committed in one transaction, so an interrupted run keeps everything
finished before it and never leaves a half-written row.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from facerace.files import default_cache_dir


class EmbeddingCache:
    """Maps (pipeline id, sha256 of the image bytes) -> (embedding, detected flag)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.path = Path(directory or default_cache_dir()) / "embeddings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS embeddings (pipeline TEXT, digest TEXT, vector BLOB, detected INTEGER,"
            " PRIMARY KEY (pipeline, digest))"
        )

    def get_many(self, pipeline: str, digests: list[str]) -> dict[str, tuple[np.ndarray, bool]]:
        """Cached entries among `digests`."""
        found: dict[str, tuple[np.ndarray, bool]] = {}
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT digest, vector, detected FROM embeddings WHERE pipeline=? AND digest IN ({marks})",
                [pipeline, *chunk],
            )
            for digest, blob, detected in rows:
                found[digest] = (np.frombuffer(blob, dtype=np.float32), bool(detected))
        return found

    def put_many(self, pipeline: str, items: list[tuple[str, np.ndarray, bool]]) -> None:
        """Store (digest, vector, detected) items in one transaction."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)",
                [(pipeline, d, np.asarray(v, np.float32).tobytes(), int(det)) for d, v, det in items],
            )

    def close(self) -> None:
        self._db.close()

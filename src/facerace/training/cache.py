"""An on-disk embedding cache: SQLite, one row per (pipeline, image content hash).

Each batch is committed in one transaction, so an interrupted run keeps everything
finished before it and never leaves a half-written row. A damaged cache file is moved
aside (`embeddings.sqlite.damaged`) and started afresh, and damaged rows are recomputed,
each said on stderr.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from facerace.errors import CacheError
from facerace.files import default_cache_dir, notice


class EmbeddingCache:
    """Maps (pipeline id, sha256 of the image bytes) -> (embedding, detected flag)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.path = Path(directory or default_cache_dir()) / "embeddings.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the cache folder {self.path.parent} ({exc.strerror}); "
                             "pass --cache-dir DIR (or set FACERACE_CACHE) to use another") from None
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS embeddings (pipeline TEXT, digest TEXT, vector BLOB,"
                       " detected INTEGER, PRIMARY KEY (pipeline, digest))")
            return db
        except sqlite3.OperationalError as exc:  # unwritable, locked, a folder in the way
            raise CacheError(f"cannot use the embedding cache {self.path} ({exc}); pass --cache-dir DIR "
                             "(or set FACERACE_CACHE) to use another") from None
        except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
            return self._replace(exc)

    def _replace(self, exc: Exception) -> sqlite3.Connection:
        """Move the damaged cache file aside and open a new, empty one."""
        if getattr(self, "_db", None) is not None:
            self._db.close()
        aside = self.path.with_name(self.path.name + ".damaged")
        for suffix in ("-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        if self.path.is_file():
            self.path.replace(aside)
        notice(f"the embedding cache {self.path} is damaged ({exc}); moved it to {aside.name} and "
               "recomputing what it held")
        self._db = None
        return self._open()

    def get_many(self, pipeline: str, digests: list[str], dim: int) -> dict[str, tuple[np.ndarray, bool]]:
        """Cached entries among `digests`; entries that are not `dim` finite float32 values are left out
        (so they are recomputed)."""
        try:
            return self._read(pipeline, digests, dim)
        except sqlite3.OperationalError as exc:
            raise CacheError(f"cannot read the embedding cache {self.path} ({exc}); pass --cache-dir DIR "
                             "to use another") from None
        except sqlite3.DatabaseError as exc:
            self._db = self._replace(exc)
            return {}

    def _read(self, pipeline: str, digests: list[str], dim: int) -> dict[str, tuple[np.ndarray, bool]]:
        found: dict[str, tuple[np.ndarray, bool]] = {}
        damaged = 0
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT digest, vector, detected FROM embeddings WHERE pipeline=? AND digest IN ({marks})",
                [pipeline, *chunk],
            )
            for digest, blob, detected in rows:
                vector = np.frombuffer(blob, dtype=np.float32) if isinstance(blob, bytes) and \
                    len(blob) == 4 * dim else None
                if vector is None or not np.isfinite(vector).all():
                    damaged += 1
                    continue
                found[digest] = (vector, bool(detected))
        if damaged:
            notice(f"{damaged} cached embedding(s) in {self.path} are damaged (wrong size or not finite); "
                   "recomputing them")
        return found

    def put_many(self, pipeline: str, items: list[tuple[str, np.ndarray, bool]]) -> None:
        """Store (digest, vector, detected) items in one transaction."""
        rows = [(pipeline, d, np.asarray(v, np.float32).tobytes(), int(det)) for d, v, det in items]
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)", rows)
        except sqlite3.OperationalError as exc:
            raise CacheError(f"cannot write the embedding cache {self.path} ({exc}); pass --cache-dir DIR "
                             "to use another") from None
        except sqlite3.DatabaseError as exc:
            self._db = self._replace(exc)
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()

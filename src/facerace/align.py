"""image + faces -> chips: 5-point landmarks and dlib's standard aligned face chip."""

from __future__ import annotations

import numpy as np

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

    def align(self, rgb: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Return (landmarks (n, 5, 2) float32 in image pixels, chips (n, size, size, 3) uint8)."""
        import dlib

        if not boxes:
            return np.zeros((0, 5, 2), np.float32), np.zeros((0, self.size, self.size, 3), np.uint8)
        shapes = self._shapes(rgb, boxes)
        landmarks = np.array([[(p.x, p.y) for p in s.parts()] for s in shapes], dtype=np.float32)
        chips = dlib.get_face_chips(np.ascontiguousarray(rgb), dlib.full_object_detections(shapes), self.size, self.padding)
        return landmarks, np.stack([np.asarray(c, dtype=np.uint8) for c in chips])

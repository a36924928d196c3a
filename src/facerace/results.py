"""results: one FaceResult per face, one ImageResult per image, all through `to_dict()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

#: The keys of every output row (JSON, JSONL, CSV, HTTP), in order; error rows add "error".
#: New keys go at the end: other tools read rows by these names and positions.
ROW_KEYS = ("path", "face", "status", "box", "label", "confidence", "uncertain", "probabilities",
            "landmarks", "detection_score")

#: The 5 landmarks the detector finds (YuNet): eye centres, nose tip, mouth corners. Left and right are the
#: person's own, as in OpenCV and dlib: on a face looking at the camera, right_eye is on the picture's left.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
#: Where each name is in a YuNet detection's 5 points (its order: right eye, left eye, nose tip,
#: right mouth corner, left mouth corner).
_YUNET_ORDER = (1, 0, 2, 4, 3)


def named_landmarks(points: Sequence[float] | None) -> tuple[tuple[float, float], ...]:
    """A detection's 5 landmarks (10 floats x0, y0, ... in YuNet's order) in LANDMARK_NAMES order; () without any."""
    if not points:
        return ()
    return tuple((round(float(points[2 * i]), 1), round(float(points[2 * i + 1]), 1)) for i in _YUNET_ORDER)


@dataclass(frozen=True)
class FaceResult:
    """One face: box [x, y, w, h] and 5 landmarks (LANDMARK_NAMES, where the detector finds them) in image pixels, the
    detector's score, and its classification.

    `label` is always the most probable class; `uncertain` is true when `confidence`
    (its probability) is below the model's threshold for the scheme. Faces smaller than the minimum
    size have status "too_small", faces beyond an image's `max_faces` largest have status
    "too_many"; neither has a label or probabilities.
    """

    box: tuple[int, int, int, int]
    landmarks: tuple[tuple[float, float], ...] = ()
    detection_score: float = 1.0
    label: str | None = None
    confidence: float | None = None
    uncertain: bool = True
    probabilities: dict[str, float] | None = None
    status: str = "ok"

    @classmethod
    def from_probabilities(cls, box: tuple[int, int, int, int], probs: Sequence[float], classes: Sequence[str],
                           threshold: float, *, landmarks: Sequence[Sequence[float]] = (),
                           detection_score: float = 1.0) -> FaceResult:
        """The result for one face from its probability vector (columns in `classes` order)."""
        top = max(range(len(classes)), key=lambda i: probs[i])
        return cls(
            box=tuple(int(v) for v in box),
            landmarks=tuple((float(x), float(y)) for x, y in landmarks),
            detection_score=round(float(detection_score), 4),
            label=classes[top],
            confidence=round(float(probs[top]), 4),
            uncertain=bool(probs[top] < threshold),
            probabilities={c: round(float(v), 4) for c, v in zip(classes, probs)},
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field; landmarks by name ({"nose": [x, y], ...}, None if not located)."""
        return {
            "status": self.status,
            "box": list(self.box),
            "landmarks": dict(zip(LANDMARK_NAMES, (list(p) for p in self.landmarks))) or None,
            "detection_score": self.detection_score,
            "label": self.label,
            "confidence": self.confidence,
            "uncertain": self.uncertain,
            "probabilities": dict(self.probabilities) if self.probabilities is not None else None,
        }


@dataclass(frozen=True)
class ImageResult:
    """Everything found in one image: its faces, or the error that stopped it."""

    path: str
    faces: tuple[FaceResult, ...] = ()
    shape: tuple[int, int] | None = None
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def status(self) -> str:
        """"error", "no_face" or "ok"."""
        if self.error is not None:
            return "error"
        return "ok" if self.faces else "no_face"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: path, status, shape, faces, error, timings."""
        return {
            "path": self.path,
            "status": self.status,
            "shape": list(self.shape) if self.shape else None,
            "faces": [f.to_dict() for f in self.faces],
            "error": self.error,
            "timings_ms": dict(self.timings_ms),
        }

    def rows(self) -> list[dict[str, Any]]:
        """One flat output row per face (keys ROW_KEYS), or one no_face / error row."""
        if self.status != "ok":
            row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
            row.update(path=self.path, status=self.status, uncertain=None)
            if self.error is not None:
                row["error"] = self.error
            return [row]
        rows = []
        for i, face in enumerate(self.faces):
            d = face.to_dict()
            rows.append({"path": self.path, "face": i, **{k: d[k] for k in ROW_KEYS[2:]}})
        return rows

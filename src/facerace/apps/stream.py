"""Video and webcam: detect every frame, track faces by IoU, smooth each track's probabilities.

Each track is classified when it appears and then every `classify_every` frames; between
those the detector alone follows it, which keeps the frame rate up on a CPU.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from facerace.detect import Detection
from facerace.errors import InvalidParameterError
from facerace.files import partial_name
from facerace.predictor import Predictor
from facerace.results import FaceResult


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two [x, y, w, h] boxes."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


@dataclass
class Track:
    """A face followed across frames, with its recent probability vectors."""

    id: int
    box: tuple[int, int, int, int]
    history: deque = field(default_factory=lambda: deque(maxlen=10))
    last_seen: int = 0
    last_classified: int = -10**9

    def smoothed(self) -> np.ndarray | None:
        return np.mean(self.history, axis=0) if self.history else None


@dataclass(frozen=True)
class TrackedFace:
    """One face in one frame: its track id and its (smoothed) result."""

    track_id: int
    face: FaceResult


#: File suffixes `facerace stream -o` writes an annotated video to (other files get the rows).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v")

#: The keys of every stream row (`facerace stream --format jsonl`), in order.
STREAM_KEYS = ("frame", "time_s", "track", "status", "box", "label", "confidence", "uncertain")


@dataclass(frozen=True)
class FrameResult:
    """Everything found in one frame; `time_s` is its time in the video (None where the source gives no rate)."""

    index: int
    faces: tuple[TrackedFace, ...]
    time_s: float | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One row per tracked face (keys STREAM_KEYS), or one `no_face` row for a frame without faces."""
        head = {"frame": self.index, "time_s": None if self.time_s is None else round(self.time_s, 3)}
        if not self.faces:
            return [{**head, **dict.fromkeys(STREAM_KEYS[2:]), "status": "no_face"}]
        return [{**head, "track": f.track_id, "status": f.face.status, "box": list(f.face.box), "label": f.face.label,
                 "confidence": f.face.confidence, "uncertain": f.face.uncertain if f.face.status == "ok" else None}
                for f in self.faces]


class Tracker:
    """Greedy IoU matching of detections to tracks; tracks unseen for `max_age` frames end."""

    def __init__(self, iou_threshold: float = 0.3, max_age: int = 10, smooth: int = 10) -> None:
        self.iou_threshold, self.max_age, self.smooth = iou_threshold, max_age, smooth
        self.tracks: list[Track] = []
        self._next_id = 1

    def update(self, detections: list[Detection], frame: int) -> list[tuple[Track, Detection]]:
        """Match detections to tracks (creating new ones); return (track, detection) pairs."""
        pairs = sorted(((iou(t.box, d.box), ti, di) for ti, t in enumerate(self.tracks)
                        for di, d in enumerate(detections)), reverse=True)
        used_t, used_d, matched = set(), set(), []
        for score, ti, di in pairs:
            if score < self.iou_threshold or ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            matched.append((self.tracks[ti], detections[di]))
        for di, d in enumerate(detections):
            if di not in used_d:
                track = Track(self._next_id, d.box, deque(maxlen=self.smooth))
                self._next_id += 1
                self.tracks.append(track)
                matched.append((track, d))
        for track, d in matched:
            track.box, track.last_seen = d.box, frame
        self.tracks = [t for t in self.tracks if frame - t.last_seen <= self.max_age]
        return matched


@contextmanager
def _opencv_quiet() -> Iterator[None]:
    """Hide what OpenCV and FFmpeg print on stderr while a source opens (raw `[ WARN:0@...]` lines), unless the
    user asked for them with OPENCV_LOG_LEVEL; facerace reports a failure itself, in one line."""
    import cv2

    if os.environ.get("OPENCV_LOG_LEVEL"):
        yield
        return
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        cv2.utils.logging.setLogLevel(level)


def open_source(source: int | str):
    """An OpenCV VideoCapture for a webcam index, a file or a URL; one clear error when it cannot be opened."""
    import cv2

    if isinstance(source, str) and source.isdigit():
        source = int(source)
    if isinstance(source, str) and "://" not in source and not Path(source).is_file():
        raise InvalidParameterError(f"{source}: no such video file (give a file, a URL or a webcam index)")
    with _opencv_quiet():
        capture = cv2.VideoCapture(source)
        opened = capture.isOpened()
    if not opened:
        capture.release()
        what = (f"camera {source} (no such camera, no permission, or in use by another program)"
                if isinstance(source, int) else f"video source {source!r} (not a video OpenCV can read, or the "
                                                  "stream is unreachable)")
        raise InvalidParameterError(f"cannot open {what}; set OPENCV_LOG_LEVEL=INFO to see OpenCV's own messages")
    return capture


def stream(
    source: int | str,
    predictor: Predictor | None = None,
    *,
    output: str | Path | None = None,
    display: bool = False,
    classify_every: int = 5,
    smooth: int = 10,
    max_frames: int | None = None,
    report_every_s: float | None = None,
) -> Iterator[FrameResult]:
    """Yield one FrameResult per frame of `source`; optionally write/display annotated frames (boxes, labels
    and track ids).

    Ends at the end of the video, after `max_frames`, or on Ctrl-C; the output video is
    always finished properly.
    """
    import cv2

    from facerace.apps.draw import annotate

    predictor = predictor or Predictor()
    classes = predictor.classes
    capture = open_source(source)
    writer = None
    tracker = Tracker(smooth=smooth)
    start, frame_index = time.perf_counter(), 0
    rate = capture.get(cv2.CAP_PROP_FPS) or None
    last_report = start
    try:
        while max_frames is None or frame_index < max_frames:
            ok, bgr = capture.read()
            if not ok:
                break
            rgb = np.ascontiguousarray(bgr[:, :, ::-1])
            matched = tracker.update(predictor.detect(rgb), frame_index)
            large = {id(d) for d in predictor.pipeline.large([d for _, d in matched])}
            due = [(t, d) for t, d in matched if frame_index - t.last_classified >= classify_every and id(d) in large]
            if due:
                result = predictor.predict_image(rgb, faces=[d for _, d in due])
                for (track, _), face in zip(due, result.faces):
                    if face.probabilities is not None:
                        track.history.append(np.array([face.probabilities[c] for c in classes]))
                        track.last_classified = frame_index
            faces = tuple(TrackedFace(t.id, _face(t, d, id(d) in large, classes, predictor.effective_threshold))
                          for t, d in matched)
            if output is not None or display:
                shown = np.asarray(annotate(rgb, [f.face for f in faces], tags=[f"#{f.track_id}" for f in faces])
                                   )[:, :, ::-1]
                if output is not None:
                    if writer is None:  # written under a hidden name, renamed when finished
                        partial = partial_name(Path(output))
                        writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), rate or 25.0,
                                                 (shown.shape[1], shown.shape[0]))
                    writer.write(np.ascontiguousarray(shown))
                if display:
                    cv2.imshow("facerace", np.ascontiguousarray(shown))
                    if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                        break
            frame_index += 1
            now = time.perf_counter()
            if report_every_s is not None and now - last_report >= report_every_s:
                print(f"frame {frame_index}: {frame_index / (now - start):.1f} frames/s, "
                      f"{len(faces)} face(s)", file=sys.stderr)
                last_report = now
            yield FrameResult(frame_index - 1, faces, (frame_index - 1) / rate if rate else None)
    except KeyboardInterrupt:
        pass
    finally:
        capture.release()
        if writer is not None:
            writer.release()
            os.replace(partial, output)
        if display:
            cv2.destroyAllWindows()
        if report_every_s is not None:
            elapsed = time.perf_counter() - start
            print(f"{frame_index} frames in {elapsed:.1f} s: {frame_index / elapsed if elapsed else 0:.1f} frames/s",
                  file=sys.stderr)


def _face(track: Track, detection: Detection, large: bool, classes: tuple[str, ...], threshold: float
          ) -> FaceResult:
    """The track's smoothed result; a face never classified is "too_small" or, while it waits its turn, "pending"."""
    probs = track.smoothed()
    if probs is None:
        return FaceResult(box=detection.box, detection_score=detection.score,
                          status="pending" if large else "too_small")
    return FaceResult.from_probabilities(detection.box, probs, classes, threshold, detection_score=detection.score)

"""`facerace stream` on a short video built from real faces moving across the frame."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from facerace.apps.cli import main
from facerace.apps.draw import annotate
from facerace.apps.stream import STREAM_KEYS, Tracker, iou, stream
from facerace.detect import Detection
from facerace.results import FaceResult

FRAMES = 24


@pytest.fixture(scope="module")
def video(tmp_path_factory, faces):
    """640x480, 24 frames: two real faces sliding right by 6 px per frame."""
    path = tmp_path_factory.mktemp("video") / "two_faces.mp4"
    a = np.asarray(Image.open(faces[0]).convert("RGB").resize((160, 160)))
    b = np.asarray(Image.open(faces[1]).convert("RGB").resize((160, 160)))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 12, (640, 480))
    for i in range(FRAMES):
        frame = np.full((480, 640, 3), 200, np.uint8)
        frame[60:220, 20 + 6 * i:180 + 6 * i] = a
        frame[280:440, 300 + 6 * i:460 + 6 * i] = b
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    return path


def test_tracks_follow_faces_with_stable_labels(video, tmp_path):
    out = tmp_path / "out.mp4"
    frames = list(stream(str(video), output=out, classify_every=4))
    assert len(frames) == FRAMES
    tracks: dict[int, list] = {}
    for f in frames:
        assert len(f.faces) == 2
        for tf in f.faces:
            tracks.setdefault(tf.track_id, []).append(tf.face)
    assert len(tracks) == 2  # no track lost or split while the faces move
    for faces in tracks.values():
        assert len({f.label for f in faces}) == 1  # smoothed: no flicker
        xs = [f.box[0] for f in faces]
        assert xs[-1] - xs[0] > 100  # the box moved with the face
    written = cv2.VideoCapture(str(out))
    assert int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    written.release()


def test_cli_stream_headless(video, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    assert main(["stream", "--source", str(video), "--output", str(out), "--no-display", "--max-frames", "10"]) == 0
    captured = capsys.readouterr()
    assert out.stat().st_size > 0 and "frames/s" in captured.err and captured.out == ""  # a video -o: no rows
    assert main(["stream", "--source", str(tmp_path / "missing.mp4")]) == 2
    assert main(["stream", "--source", str(video), "-o", str(tmp_path / "rows.txt")]) == 2
    assert ".jsonl" in capsys.readouterr().err


def test_cli_stream_rows_per_frame_and_track(video, tmp_path, capsys):
    """stream writes one JSON row per frame and track (it printed only the frame rate)."""
    args = ["--format", "jsonl", "--max-frames", "6", "--classify-every", "2"]
    assert main(["stream", "--source", str(video), *args]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["frame"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert all(list(r) == list(STREAM_KEYS) for r in rows)
    assert {r["track"] for r in rows} == {1, 2} and rows[0]["time_s"] == 0 and rows[2]["time_s"] == round(1 / 12, 3)
    assert all(r["status"] == "ok" and r["label"] and 0 < r["confidence"] <= 1 and len(r["box"]) == 4 for r in rows)
    out = tmp_path / "rows" / "tracks.jsonl"
    assert main(["stream", "--source", str(video), "-o", str(out), "--max-frames", "2"]) == 0
    assert len(out.read_text().splitlines()) == 4 and capsys.readouterr().out == ""
    video_out = tmp_path / "labelled.mp4"  # rows on stdout beside the annotated video
    assert main(["stream", "--source", str(video), "-o", str(video_out), "--format", "jsonl", "--max-frames", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4 and video_out.stat().st_size > 0


def test_track_ids_are_drawn(face_rgb):
    """The annotated video shows each face's track id before its label."""
    face = FaceResult(box=(20, 40, 120, 120), label="White", confidence=0.9, uncertain=False,
                      probabilities={"White": 0.9})
    plain = np.asarray(annotate(face_rgb, [face]))
    tagged = np.asarray(annotate(face_rgb, [face], tags=["#7"]))
    assert not np.array_equal(plain, tagged)
    assert np.array_equal(np.asarray(annotate(face_rgb, [face], tags=[])), plain)


def test_unopenable_camera_is_one_clear_message(capfd):
    """OpenCV's raw `[ WARN:0@...] cap_v4l ...` lines are hidden; facerace says what failed, once."""
    assert main(["stream", "--source", "57"]) == 2
    err = capfd.readouterr().err
    assert "cannot open camera 57" in err and "WARN" not in err and "cap_" not in err
    assert len(err.strip().splitlines()) == 1


def test_tracker_matches_by_iou():
    tracker = Tracker()
    first = tracker.update([Detection((0, 0, 10, 10), 1.0), Detection((50, 50, 10, 10), 1.0)], 0)
    second = tracker.update([Detection((52, 51, 10, 10), 1.0), Detection((1, 0, 10, 10), 1.0)], 1)
    assert {t.id for t, _ in first} == {t.id for t, _ in second} == {1, 2}
    assert dict((t.id, d.box[0]) for t, d in second) == {1: 1, 2: 52}
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)

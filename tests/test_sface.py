"""SFace: the derived float32 graph against OpenCV's int8 model, and the alignment fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cosine
from PIL import Image

from facerace.align import SFaceAligner
from facerace.backbones.sface import CHIP_SIZE, SFace, cached_sface_onnx, sface_model_file
from facerace.detect import Detection, YuNetDetector, known_face_region


@pytest.fixture(scope="module")
def detections(faces) -> list[tuple[np.ndarray, Detection]]:
    detector = YuNetDetector()
    out = []
    for path in faces:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        out.append((rgb, detector.detect(rgb)[0]))
    return out


def test_yunet_detections_carry_five_landmarks_on_the_face(detections):
    for _, face in detections:
        points = np.array(face.landmarks).reshape(5, 2)
        x, y, w, h = face.box
        margin = np.array([w, h]) / 4  # profile faces put the nose tip just outside the box
        assert ((points >= np.array([x, y]) - margin) & (points <= np.array([x + w, y + h]) + margin)).all()
        assert points[:2, 1].mean() < points[3:, 1].mean()  # eyes above the mouth


def test_float_graph_matches_opencv_int8_model(detections, tmp_path):
    import cv2

    aligner = SFaceAligner()
    chips = np.concatenate([aligner.align(rgb, [face])[1] for rgb, face in detections])
    recognizer = cv2.FaceRecognizerSF.create(str(sface_model_file()), "")
    reference = np.stack([recognizer.feature(np.ascontiguousarray(c[:, :, ::-1])).ravel() for c in chips])
    out = SFace().embed(chips)
    assert out.shape == (len(chips), 128) and out.dtype == np.float32
    assert cosine(out, reference).min() >= 0.999
    # a batch gives each chip's own descriptor, and the derived file is cached
    assert np.allclose(SFace().embed(chips[1:2]), out[1:2], atol=1e-4)
    assert cached_sface_onnx() == cached_sface_onnx()


def test_sface_chips_are_opencvs_align_crop(detections):
    import cv2

    recognizer = cv2.FaceRecognizerSF.create(str(sface_model_file()), "")
    for rgb, face in detections:
        row = np.array([[*face.box, *face.landmarks, face.score]], np.float32)
        expected = recognizer.alignCrop(rgb, row).astype(int)
        chip = SFaceAligner().crop(rgb, np.array(face.landmarks).reshape(5, 2))
        assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3)
        assert np.abs(chip - expected).mean() < 0.01  # the warp's rounding differs at a few border pixels


def test_landmarks_without_detector_landmarks_are_searched_near_the_box(detections):
    rgb, face = detections[0]
    aligner = SFaceAligner()
    points, source = aligner.landmarks(rgb, Detection(face.box, 1.0))
    assert source == "search"
    assert np.abs(points - np.array(face.landmarks).reshape(5, 2)).max() < 0.1 * face.box[2]
    assert aligner.landmarks(rgb, face)[1] == "detector"


def test_landmarks_fall_back_to_fixed_box_positions_when_no_face_is_found():
    blank = np.full((200, 200, 3), 127, np.uint8)
    face = known_face_region(blank.shape, 0.25)
    points, source = SFaceAligner().landmarks(blank, face)
    x, y, w, h = face.box
    assert source == "box"
    assert points.shape == (5, 2) and x < points[:, 0].min() and points[:, 0].max() < x + w
    assert SFaceAligner().align(blank, [face])[1].shape == (1, CHIP_SIZE, CHIP_SIZE, 3)
    assert SFaceAligner().align(blank, [])[1].shape == (0, CHIP_SIZE, CHIP_SIZE, 3)

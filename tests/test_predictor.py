import pickle

import numpy as np
import pytest
from conftest import fixture_labels, needs_dataset
from PIL import Image

import facerace
from facerace.detect import Detection
from facerace.errors import ImageError, InvalidParameterError
from facerace.labels import get_scheme


@pytest.fixture(scope="module")
def predictor():
    return facerace.Predictor()


def check_face(face, classes, threshold, landmarks=5):
    assert face.status == "ok"
    assert list(face.probabilities) == list(classes)
    assert abs(sum(face.probabilities.values()) - 1) < 1e-3
    assert face.label == max(face.probabilities, key=face.probabilities.get)
    assert face.confidence == face.probabilities[face.label]
    assert face.uncertain == (face.confidence < threshold)
    assert len(face.landmarks) == landmarks and len(face.box) == 4


def test_analyze_returns_one_face_per_fairface_crop(faces):
    for path in faces:
        found = facerace.analyze(str(path))
        assert len(found) == 1
        check_face(found[0], get_scheme("fairface7").classes, facerace.Predictor().config.threshold)


def test_result_roundtrip_is_json(faces):
    import json

    face = facerace.analyze(faces[0])[0]
    d = face.to_dict()
    assert json.loads(json.dumps(d)) == d


def test_schemes_sum_the_finer_probabilities(faces):
    p7 = facerace.analyze(faces[1], scheme="fairface7")[0].probabilities
    p6 = facerace.analyze(faces[1], scheme="race6")[0].probabilities
    assert p6["Asian"] == pytest.approx(p7["East Asian"] + p7["Southeast Asian"], abs=2e-4)
    assert p6["White"] == pytest.approx(p7["White"], abs=1e-4)


def test_predictor_is_picklable_and_lazy(faces):
    p = facerace.Predictor(scheme="utk5")
    assert p._loaded is None
    p.predict(faces[0])
    assert p._loaded is not None
    clone = pickle.loads(pickle.dumps(p))
    assert clone._loaded is None
    a, b = p.predict(faces[0])[0], clone.predict(faces[0])[0]
    assert a.faces == b.faces


def test_all_input_types_and_batches(predictor, faces):
    arr = np.asarray(Image.open(faces[2]).convert("RGB"))
    results = predictor.predict([str(faces[2]), faces[2].read_bytes(), Image.open(faces[2]), arr])
    assert len(results) == 4
    assert len(predictor.predict(p for p in faces[:2])) == 2 and len(predictor.predict(arr)) == 1
    assert len({r.faces[0].label for r in results}) == 1


def test_bring_your_own_boxes(predictor, face_rgb):
    result = predictor.predict_image(face_rgb, faces=[Detection((40, 40, 140, 140), 1.0)])
    assert result.faces[0].box == (40, 40, 140, 140)


def test_bad_input_is_a_result_not_an_exception(predictor, bad_inputs):
    for kind in ("not_image", "truncated", "empty", "bomb"):
        result = predictor.predict_image(bad_inputs[kind])
        assert result.status == "error" and result.error
    with pytest.raises(ImageError):
        facerace.analyze(bad_inputs["empty"])


def test_awkward_images_still_give_faces(predictor, bad_inputs):
    for kind in ("gray", "rgba", "sixteen", "cmyk", "palette", "exif_rotated", "animated"):
        assert predictor.predict_image(bad_inputs[kind]).status == "ok", kind


def test_no_face_many_faces_tiny_face(predictor, bad_inputs):
    assert predictor.predict_image(bad_inputs["blank"]).status == "no_face"
    assert len(predictor.predict_image(bad_inputs["thirty"]).faces) >= 27
    tiny = predictor.predict_image(bad_inputs["tiny_face"])
    assert tiny.status == "no_face" or all(f.status == "too_small" and f.label is None for f in tiny.faces)


def test_other_detectors_find_the_face(faces):
    for name in ("hog", "haar", "none"):
        result = facerace.Predictor(detector=name).predict_image(faces[0])
        assert result.status == "ok", name
        # only YuNet locates landmarks
        check_face(result.faces[0], get_scheme("fairface7").classes, facerace.Predictor().config.threshold, 0)


def test_options_are_validated():
    with pytest.raises(InvalidParameterError, match="scheme"):
        facerace.Predictor(scheme="race9").validate()
    with pytest.raises(InvalidParameterError, match="detector"):
        facerace.Predictor(detector="mtcnn").validate()
    with pytest.raises(InvalidParameterError, match="threshold"):
        facerace.Predictor(threshold=2).validate()


def test_parallel_paths_match_serial(predictor, faces):
    serial = [predictor.predict_image(p) for p in faces]
    parallel = list(predictor.predict_paths(faces, workers=2))
    assert [r.faces for r in serial] == [r.faces for r in parallel]


def test_fixture_faces_are_mostly_right(predictor, faces):
    """The shipped model on the 7 real fixtures: a broken pipeline (wrong channel order, bad chips) fails this."""
    truth = [r["race"] for r in fixture_labels()]
    labels = [predictor.predict_image(p).faces[0].label for p in faces]
    assert sum(t == p for t, p in zip(truth, labels)) >= 3  # chance would give 1


def test_accuracy_on_real_fairface_val_sample(predictor):
    """200 real FairFace val images (male faces): far above chance (1/7) through the whole pipeline."""
    import csv

    root = needs_dataset("fairface")
    with open(root / "fairface_label_val.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:200]
    results = list(predictor.predict_paths([root / r["file"] for r in rows], workers=2))
    right = sum(bool(res.faces) and res.faces[0].label == r["race"] for res, r in zip(results, rows))
    assert right / len(rows) >= 0.5

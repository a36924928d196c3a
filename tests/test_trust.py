"""Results users can trust: OpenCV's BGR arrays, rates with intervals, per-scheme thresholds, training overlap."""

import json
import shutil

import numpy as np
import pytest
from conftest import run_cli

import facerace
from facerace.errors import InvalidParameterError
from facerace.images import load_image
from facerace.labels import convert_probabilities
from facerace.model import load_config, resolve
from facerace.training.metrics import classification_metrics, group_metrics, scheme_thresholds, wilson


# ---- OpenCV's BGR arrays ------------------------------------------------------------------------------------
def test_bgr_arrays_read_as_opencv_gives_them(faces, face_rgb):
    import cv2

    bgr = cv2.imread(str(faces[0]))
    assert np.array_equal(load_image(bgr, color="bgr"), face_rgb)
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    assert np.array_equal(load_image(bgra, color="bgr"), face_rgb)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(load_image(gray, color="bgr"), load_image(gray))
    predictor = facerace.Predictor()
    expected = predictor.predict_image(face_rgb).faces[0]
    assert predictor.predict_image(bgr, color="bgr").faces[0] == expected
    assert predictor.predict([bgr], color="bgr")[0].faces[0] == expected
    assert facerace.analyze(bgr, color="bgr")[0] == facerace.analyze(face_rgb)[0]
    # read as RGB, the same array gives other probabilities: the reason color= exists
    assert predictor.predict_image(bgr).faces[0].probabilities != expected.probabilities


def test_color_is_refused_where_it_cannot_apply(faces):
    with pytest.raises(InvalidParameterError, match="numpy arrays"):
        load_image(faces[0], color="bgr")  # files are decoded as RGB
    with pytest.raises(InvalidParameterError, match="unknown color"):
        load_image(np.zeros((8, 8, 3), np.uint8), color="BGR8")


# ---- rates with counts and Wilson intervals -------------------------------------------------------------------
def test_wilson_interval_against_known_values():
    low, high = wilson(9, 16)  # an age group of 16 faces at "56.2%"
    assert (round(low, 3), round(high, 3)) == (0.332, 0.769)
    assert wilson(0, 10)[0] == 0 and wilson(10, 10)[1] == pytest.approx(1) and wilson(0, 0) is None
    low, high = wilson(1788, 2871)
    assert high - low < 0.04 and low < 1788 / 2871 < high


def test_every_rate_carries_its_count_and_interval():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])
    m = classification_metrics(y, probs, ("a", "b"))
    assert m["correct"] == 2 and m["accuracy_ci95"] == wilson(2, 4)
    a = m["per_class"]["a"]
    assert (a["correct"], a["support"], a["predicted"]) == (1, 2, 2)
    assert a["recall_ci95"] == wilson(1, 2) and a["precision_ci95"] == wilson(1, 2)
    g = group_metrics(["m"] * 60 + [None] * 20, np.tile(y, 20), np.tile(probs.argmax(1), 20), 2)["m"]
    assert (g["n"], g["correct"], g["measured"]) == (60, 30, True) and g["accuracy_ci95"] == wilson(30, 60)
    g = group_metrics(["m", "m", "m", None], y, probs.argmax(1), 2)["m"]  # too few to measure: counts only
    assert (g["n"], g["correct"], g["measured"], g["accuracy"], g["accuracy_ci95"]) == (3, 2, False, None, None)


def test_reliability_plot_skips_empty_bins_and_shows_counts(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from facerace.training.metrics import reliability
    from facerace.training.plots import plot_reliability

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    confidence = np.array([0.95, 0.97, 0.94, 0.55, 0.56])
    bins = reliability(confidence, np.array([1, 1, 0, 1, 0.0]))
    plot_reliability(bins, 0.1, tmp_path / "r.png")
    ax = drawn[0].axes[0]
    bars = [p for p in ax.patches if p.get_width() < 0.2]
    assert len(bars) == 2  # two filled bins of 15: empty bins are not drawn as zero accuracy
    assert sorted(round(b.get_height(), 3) for b in bars) == [0.5, 0.667]
    assert {t.get_text() for t in ax.texts} >= {"3", "2"}  # the faces behind each bar


# ---- one uncertainty threshold per scheme --------------------------------------------------------------------
def test_thresholds_are_chosen_per_scheme():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(700, 7)) * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(7, p=p) for p in probs])
    t = scheme_thresholds(y, probs, "fairface7", 0.8)
    assert set(t) == {"fairface7", "race6", "utk5", "race4"}
    assert t["race6"]["threshold"] != t["fairface7"]["threshold"]
    assert t["race4"]["n"] < 700  # faces of classes race4 drops are left out of its threshold
    p6 = convert_probabilities(probs, "fairface7", "race6")
    six = np.array([0, 1, 2, 3, 3, 4, 5])[y]
    keep = p6.max(1) >= t["race6"]["threshold"]
    assert np.mean(p6[keep].argmax(1) == six[keep]) >= 0.8


def test_predictor_uses_its_schemes_threshold(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(resolve("default"), model)
    config = json.loads((model / "config.json").read_text())
    config["thresholds"] = {"race6": 0.99, "race4": 0.11}
    (model / "config.json").write_text(json.dumps(config))
    assert facerace.Predictor(model, scheme="race6").effective_threshold == 0.99
    assert facerace.Predictor(model, scheme="race4").effective_threshold == 0.11
    assert facerace.Predictor(model, scheme="race6", threshold=0.3).effective_threshold == 0.3
    for key in ("thresholds", "training_files", "training_files_sha256", "caveat"):
        config.pop(key, None)  # a config written before these existed still loads
    (model / "config.json").write_text(json.dumps(config))
    assert facerace.Predictor(model, scheme="race6").effective_threshold == config["threshold"]


def test_shipped_models_have_digests_caveat_and_both_genders():
    from facerace.model import SHIPPED, training_digests

    models = facerace.list_models()
    assert [m["name"] for m in models] == list(SHIPPED) == ["default", "fast"]
    for m in models:
        config = load_config(m["name"])
        digests = training_digests(m["name"], config)
        assert digests is not None and len(digests) > 30_000 and np.all(np.diff(digests.astype(np.float64)) > 0)
        assert "40% women" in m["caveat"] and "Middle Eastern women" in m["caveat"]
        assert m["training_mix"]["per_gender"] == {"Female": 12_011, "Male": 18_089}
        assert m["thresholds"]["fairface7"] == config.threshold
        assert m["metrics"]["fairface_val_fairface7_worst_group"]  # the worst group is stated where models are listed
    code, out, _ = run_cli("models")
    assert code == 0 and out.count("fairface val fairface7: accuracy 0.") == 2 and out.count(" faces/s (") == 2
    assert out.count("worst race x gender group") == 4 and "held-out training faces: accuracy" in out


def test_training_caveat_names_a_single_gender():
    from facerace.training.train import training_caveat

    assert training_caveat({"a": {"per_gender": {"Male": 30}}, "b": {"per_gender": {"Male": 5, "unknown": 2}}}) \
        == "Trained on male faces only (2 of unknown gender): accuracy on other faces is not measured by its " \
           "validation split."
    assert training_caveat({"a": {"per_gender": {"Male": 3, "Female": 4}}}) == ""
    assert training_caveat({"a": {"per_gender": {"unknown": 3}}}) == ""


# ---- evaluating a model on its own training images -----------------------------------------------------------
@pytest.fixture(scope="module")
def unsplit_folder(tmp_path_factory, faces):
    """A `folder:` dataset without split sub-folders: 21 images, three per class."""
    from conftest import fixture_labels
    from PIL import Image, ImageOps

    root = tmp_path_factory.mktemp("unsplit")
    for r, path in zip(fixture_labels(), faces):
        (root / r["race"]).mkdir()
        img = Image.open(path).convert("RGB")
        for i, variant in enumerate((img, ImageOps.mirror(img), img.point(lambda v: min(255, v + 25)))):
            variant.save(root / r["race"] / f"{i}.jpg", quality=95)
    return root


def test_evaluating_on_training_images_warns(unsplit_folder, tmp_path, capsys):
    from facerace.apps.cli import main

    common = ["--data", f"folder:{unsplit_folder}", "--cache-dir", str(tmp_path / "cache"), "--quiet",
              "--workers", "1"]
    run = tmp_path / "run"
    assert main(["train", *common, "--out", str(run), "--max-epochs", "5", "--val-fraction", "0.34"]) == 0
    err = capsys.readouterr().err
    assert "facerace train: warning:" in err and "no split 'train'" in err and "all of its 21 images" in err
    config = load_config(run)
    assert config.training_files and config.training_files_sha256
    assert set(config.thresholds) == {"fairface7", "race6", "utk5", "race4"}
    assert config.caveat == ""  # genders unknown: nothing to warn about

    assert main(["evaluate", "--model", str(run), *common, "--out", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    assert "no split 'val'" in err
    assert "21 of the 21 evaluated images (100.0%) are byte-identical to images of the model's training" in err
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["training_overlap"]["images"] == 21 and len(m["warnings"]) == 2
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "**Warning:**" in report and "95% CI" in report

    # the shipped model was not trained on these: no overlap, and a model without digests still evaluates
    legacy = tmp_path / "legacy"
    shutil.copytree(resolve("default"), legacy)
    config = json.loads((legacy / "config.json").read_text())
    for key in ("training_files", "training_files_sha256"):
        config.pop(key, None)
    (legacy / "config.json").write_text(json.dumps(config))
    (legacy / "training_files.npy").unlink(missing_ok=True)
    assert main(["evaluate", "--model", str(legacy), *common, "--split", "all", "--out", str(tmp_path / "ev2")]) == 0
    assert "warning" not in capsys.readouterr().err
    m = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert m["training_overlap"] is None and m["warnings"] == []
    assert "unknown (the model stores no digests" in (tmp_path / "ev2" / "report.md").read_text()

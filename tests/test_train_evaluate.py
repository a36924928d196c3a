"""train -> model folder -> evaluate, end to end on a small FairFace-layout dataset made from the fixtures."""

import json

import numpy as np
import pytest
from conftest import FIXTURES

from facerace.apps.cli import main
from facerace.errors import FaceraceError
from facerace.head import HeadParams, RaceHead, fit_temperature, softmax
from facerace.predictor import Predictor
from facerace.training.metrics import (
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    group_metrics,
)
from facerace.training.train import stratified_split


def test_train_then_predict_then_evaluate(tiny_fairface, tmp_path):
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    args = ["--data", f"fairface:{tiny_fairface}", "--cache-dir", str(cache), "--quiet", "--workers", "1"]
    assert main(["train", *args, "--out", str(run), "--max-epochs", "40", "--val-fraction", "0.34"]) == 0
    for name in ("config.json", "metrics.json", "history.csv", "loss.png", "model/config.json", "model/head.safetensors"):
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_validation"] == 7 and metrics["data"][f"fairface:{tiny_fairface}"]["used"] == 21
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] <= 40
    # the held-out faces' calibrated probabilities and classes are stored with the model (for audit)
    from facerace.model import load_config, load_heldout

    mix = load_config(run).training_mix  # every used image per class x gender, for model cards and listings
    assert mix["data"] == ["FairFace train"] and mix["images"] == 21 and mix["per_gender"] == {"Male": 21}
    assert mix["per_race_gender"]["Middle Eastern"] == {"Male": 3} and len(mix["per_race_gender"]) == 7
    held = load_heldout(run, load_config(run))
    assert held.probabilities.shape == (7, 7) and sorted(held.labels) == list(range(7))
    np.testing.assert_allclose(held.probabilities.sum(1), 1, atol=1e-5)

    result = Predictor(run).predict_image(FIXTURES / "354.jpg")
    assert result.faces[0].probabilities is not None

    # a second run reuses the cache: nothing is recomputed, and an existing --out is refused
    assert main(["train", *args, "--out", str(tmp_path / "run2"), "--max-epochs", "2"]) == 0
    again = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert again["data"][f"fairface:{tiny_fairface}"]["computed_now"] == 0
    assert main(["train", *args, "--out", str(run)]) == 2

    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), *args, "--split", "val", "--out", str(ev)]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "per_class", "n", "loss", "ece", "per_age"} <= set(m)
    assert m["n"] == 21 and m["scheme"] == "fairface7"
    for name in ("confusion.png", "reliability.png", "predictions.csv", "report.md"):
        assert (ev / name).stat().st_size > 0, name
    assert "![confusion matrices](confusion.png)" in (ev / "report.md").read_text()
    male = m["per_gender"]["Male"]  # 21 faces: too few to measure, counts kept
    assert (male["n"], male["measured"], male["accuracy"], male["macro_f1"]) == (21, False, None, None)
    assert m["worst_group"] is None and m["gender_gap"] is None and m["per_race_gender"]["Black"]["Male"]["n"] == 3
    assert main(["evaluate", "--model", str(run), *args, "--scheme", "race6", "--out", str(tmp_path / "e6")]) == 0
    m6 = json.loads((tmp_path / "e6" / "metrics.json").read_text())
    assert m6["merged"] == {"Asian": ["East Asian", "Southeast Asian"]} and m6["accuracy"] >= m["accuracy"]


def test_tampered_weights_are_refused(tmp_path, tiny_fairface):
    import shutil

    from facerace.model import load_model, resolve

    model = tmp_path / "m"
    shutil.copytree(resolve("default"), model)
    data = bytearray((model / "head.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (model / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(FaceraceError, match="SHA-256"):
        load_model(model)


def test_stratified_split_is_seeded_and_stratified():
    y = np.repeat(np.arange(4), 50)
    tr, va = stratified_split(y, 0.12, seed=3)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 200
    assert all(np.sum(y[va] == c) == 6 for c in range(4))
    assert np.array_equal(va, stratified_split(y, 0.12, seed=3)[1])


def test_head_learns_separable_data_and_stops_early():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    y = rng.integers(0, 3, 600)
    x = centres[y] + rng.normal(size=(600, 16))
    head = RaceHead(("a", "b", "c"), HeadParams(hidden=32, dropout=0.2, learning_rate=1e-3, patience=3, max_epochs=30)).fit(x[:500], y[:500], x[500:], y[500:])
    assert (head.predict(x[500:]) == y[500:]).mean() > 0.95
    noise = rng.integers(0, 3, 600)  # labels unrelated to x: validation loss only gets worse
    head = RaceHead(("a", "b", "c"), HeadParams(hidden=64, dropout=0.0, learning_rate=1e-3, patience=3, max_epochs=100)).fit(x[:500], noise[:500], x[500:], noise[500:])
    h = head.history_
    assert len(h.train_loss) == h.best_epoch + 1 + 3 < 100
    assert h.best_epoch == int(np.argmin(h.val_loss))


def test_metrics_against_hand_computed_values():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])  # predictions 0, 0, 1, 1: two right
    m = classification_metrics(y, probs, ("a", "b"))
    assert m["accuracy"] == 0.5 and m["confusion"] == [[1, 1], [1, 1]]
    assert {k: m["per_class"]["a"][k] for k in ("precision", "recall", "f1", "support")} == \
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.2])))
    # ECE with 15 bins: bins of 0.9 (right), 0.6 (wrong), 0.7 (right), 0.8 (wrong)
    assert expected_calibration_error(probs.max(1), np.array([1, 0, 1, 0.0])) == pytest.approx(
        (0.1 + 0.6 + 0.3 + 0.8) / 4)
    assert choose_threshold(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 0, 1.0]), 0.75) == 0.6
    assert choose_threshold(np.array([0.9, 0.8]), np.array([0, 0.0]), 0.75) == 1.0
    # group "m" = first three: true 0, 1, 1, predicted 0, 0, 1; both classes have F1 2/3
    groups = group_metrics(["m", "m", "m", None] * 20, np.tile(y, 20), np.tile(probs.argmax(1), 20), 2)
    assert groups.keys() == {"m"} and groups["m"]["n"] == 60
    assert groups["m"]["accuracy"] == pytest.approx(2 / 3) and groups["m"]["macro_f1"] == pytest.approx(2 / 3)


def test_temperature_undoes_overconfidence():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2000, 5)) * 2
    y = np.array([rng.choice(5, p=p) for p in softmax(logits)])
    assert fit_temperature(logits * 3, y) == pytest.approx(3, rel=0.15)


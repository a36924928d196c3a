"""Race x gender everywhere: group tables with counts and intervals, small groups, the worst group, the gap
between genders, calibration per gender; the training mix in configs, model cards and `facerace models`;
intervals and plots that never lose an evaluation."""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import run_cli

from facerace.errors import ModelIntegrityError
from facerace.model import ModelConfig, load_config, resolve
from facerace.training.metrics import (
    MIN_GROUP_FACES,
    classification_metrics,
    expected_calibration_error,
    subgroup_metrics,
    wilson,
)
from facerace.training.modelcard import evaluation_markdown

#: (class, gender, faces, right): b Female is below MIN_GROUP_FACES and the least accurate
CELLS = [("a", "Female", 60, 30), ("a", "Male", 100, 90), ("b", "Female", 40, 10), ("b", "Male", 80, 60)]


def synthetic(cells=CELLS, extra_unknown: int = 5):
    """True classes, probabilities (right faces 0.8 on their class, wrong ones 0.7 on the other), genders
    and ages for the given cells, plus faces of unknown gender."""
    y, right, genders = [], [], []
    for c, g, n, k in cells:
        y += [{"a": 0, "b": 1}[c]] * n
        right += [True] * k + [False] * (n - k)
        genders += [g] * n
    y += [0] * extra_unknown
    right += [True] * extra_unknown
    genders += [None] * extra_unknown
    y, right = np.array(y), np.array(right)
    pred = np.where(right, y, 1 - y)
    probs = np.where(right, 0.8, 0.7)[:, None] * np.eye(2)[pred] + np.where(right, 0.2, 0.3)[:, None] * np.eye(2)[1 - pred]
    ages = ["20-29" if i % 2 else "30-39" for i in range(len(y))]
    return y, probs, genders, ages


def full_metrics(y, probs, genders, ages) -> dict:
    m = classification_metrics(y, probs, ("a", "b"))
    m.update(subgroup_metrics(y, probs, ("a", "b"), genders, ages))
    m.update({"data": {"spec": "csv:x.csv", "split": "val", "known_region_used": 0}, "scheme": "race4",
              "threshold": 0.5, "uncertain": 0, "uncertain_ci95": wilson(0, m["n"]), "certain": m["n"],
              "correct_when_certain": m["correct"], "accuracy_when_certain_ci95": m["accuracy_ci95"]})
    return m


def test_race_gender_tables_give_counts_intervals_and_leave_small_groups_unmeasured():
    y, probs, genders, ages = synthetic()
    m = subgroup_metrics(y, probs, ("a", "b"), genders, ages)
    cells = m["per_race_gender"]
    assert list(cells) == ["a", "b"] and list(cells["a"]) == ["Female", "Male"]  # unknown gender left out
    a_f = cells["a"]["Female"]
    assert (a_f["n"], a_f["correct"], a_f["accuracy"], a_f["accuracy_ci95"]) == (60, 30, 0.5, wilson(30, 60))
    # precision among women predicted as a: 30 right a's, and the 30 wrong b women predicted a
    assert (a_f["predicted"], a_f["precision"], a_f["precision_ci95"]) == (60, 0.5, wilson(30, 60))
    b_f = cells["b"]["Female"]  # 40 faces: counted, not measured
    assert (b_f["n"], b_f["correct"], b_f["measured"], b_f["accuracy"], b_f["accuracy_ci95"]) == (40, 10, False, None, None)
    assert m["min_group_faces"] == MIN_GROUP_FACES == 50
    # age x gender: every (age group, gender) with its count
    assert sum(v["n"] for row in m["per_age_gender"].values() for v in row.values()) == 280
    assert set(m["per_age_gender"]["20-29"]) == {"Female", "Male"}


def test_worst_group_is_chosen_among_groups_large_enough_to_measure():
    y, probs, genders, ages = synthetic()
    w = subgroup_metrics(y, probs, ("a", "b"), genders, ages)["worst_group"]
    # b Female (25%) is less accurate but too small: the worst measured group is a Female (50%)
    assert (w["group"], w["race"], w["gender"], w["n"], w["correct"], w["accuracy"]) == \
        ("a Female", "a", "Female", 60, 30, 0.5)
    assert w["accuracy_ci95"] == wilson(30, 60) and (w["groups_measured"], w["groups_too_few"]) == (3, 1)
    y, probs, genders, ages = synthetic([("a", "Female", 30, 20), ("b", "Male", 30, 25)])
    assert subgroup_metrics(y, probs, ("a", "b"), genders, ages)["worst_group"] is None


def test_gender_gap_with_its_interval_and_ece_per_gender():
    y, probs, genders, ages = synthetic()
    m = subgroup_metrics(y, probs, ("a", "b"), genders, ages)
    gap = m["gender_gap"]
    women, men = 40 / 100, 150 / 180
    assert (gap["higher"], gap["lower"]) == ("Male", "Female")
    assert gap["points"] == pytest.approx(100 * (men - women))
    low, high = gap["points_ci95"]
    assert low < gap["points"] < high and high - low < 30
    (lw, uw), (lm, um) = wilson(40, 100), wilson(150, 180)  # Newcombe's hybrid score interval, by hand
    assert low == pytest.approx(100 * (men - women - np.hypot(men - lm, uw - women)))
    assert high == pytest.approx(100 * (men - women + np.hypot(um - men, women - lw)))
    assert gap["per_gender"]["Female"]["n"] == 100 and gap["per_gender"]["Male"]["accuracy"] == pytest.approx(men)
    female = np.array([g == "Female" for g in genders])
    correct = (probs.argmax(1) == y).astype(float)
    assert m["ece_per_gender"]["Female"] == pytest.approx(expected_calibration_error(probs[female].max(1), correct[female]))
    assert m["per_gender"]["Male"]["ece"] == m["ece_per_gender"]["Male"]
    # one gender of fewer than 50 faces: no gap
    y, probs, genders, ages = synthetic([("a", "Female", 49, 20), ("a", "Male", 100, 90)])
    one = subgroup_metrics(y, probs, ("a", "b"), genders, ages)
    assert one["gender_gap"] is None and one["ece_per_gender"]["Female"] is None


def test_report_gives_headline_figures_and_says_too_few_to_measure():
    m = full_metrics(*synthetic())
    text = "\n".join(evaluation_markdown(m))
    assert "**Worst race x gender group (of those with >= 50 faces): a women 50.0% (30 of 60; 95% CI" in text
    assert "**Gap between genders: 43.3 points (95% CI" in text and "men 83.3% (150 of 180" in text
    assert "| b | Female | 40 | too few to measure (40 faces) |" in text
    assert "25.0%" not in text  # the small group's rate is printed nowhere
    assert "ECE, 15 bins) per gender: Female" in text
    assert "| 20-29 | Female |" in text  # age x gender table


def test_report_escapes_labels_from_the_data():
    y, probs, genders, ages = synthetic()
    genders = ["F|<script>\n" if g == "Female" else g for g in genders]
    text = "\n".join(evaluation_markdown(full_metrics(y, probs, genders, ages)))
    assert "<script>" not in text and "F\\|\\<script\\>\\\\n" in text
    assert all(line.count("|") - line.count("\\|") in (0, 5, 6) for line in text.splitlines() if line.startswith("|"))


# ---- intervals and plots never lose an evaluation (issue 19 item 9) ----------------------------------------------
def test_wilson_intervals_hold_their_rate_inside_0_1():
    """A rate of 100% once had an upper bound of 0.9999999999999999 (n = 4, 10, 14, ...), below the rate."""
    for n in range(1, 301):
        for k in range(n + 1):
            low, high = wilson(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0, (k, n)


def test_reliability_plot_of_a_bin_that_is_all_right(tmp_path):
    from facerace.training.metrics import reliability
    from facerace.training.plots import plot_reliability

    for n in (4, 10, 14, 19, 24):
        bins = reliability(np.full(n, 0.97), np.ones(n))
        assert plot_reliability(bins, 0.03, tmp_path / f"r{n}.png").stat().st_size > 0


def test_a_failing_plot_never_loses_the_evaluation(tiny_fairface, tmp_path, monkeypatch):
    import facerace.training.evaluate as evaluate_module

    def broken(*args, **kwargs):
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(evaluate_module, "plot_reliability", broken)
    out = tmp_path / "ev"
    code, stdout, stderr = run_cli("evaluate", "--model", "default", "--data", f"fairface:{tiny_fairface}",
                                   "--cache-dir", tmp_path / "cache", "--quiet", "--workers", "1", "--out", out)
    assert code == 0, stderr
    assert "reliability.png was not drawn (ValueError" in stderr
    for name in ("metrics.json", "report.md", "predictions.csv", "confusion.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "reliability.png").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert any("reliability.png was not drawn" in w for w in m["warnings"])
    report = (out / "report.md").read_text()
    assert "(reliability.png)" not in report and "(confusion.png)" in report
    assert len((out / "predictions.csv").read_text().splitlines()) == 22
    # the CLI summary: headline figures, and every group of these 21 faces too few to measure
    assert "worst race x gender group (of those with >= 50 faces): none measured" in stdout
    assert "gap between genders: not measured" in stdout
    assert re.search(r"\nBlack men +3  too few to measure \(3 faces\)\n", stdout)
    assert "/3)" not in stdout and "/21)" not in stdout  # no rate of a small group, not even as a fraction
    assert m["worst_group"] is None and m["per_race_gender"]["Black"]["Male"] == {
        **m["per_race_gender"]["Black"]["Male"], "n": 3, "accuracy": None, "measured": False}


# ---- the training mix: config, model card, `facerace models`, `datasets check` ----------------------------------
MIX = {"data": ["FairFace train"], "images": 30100, "per_gender": {"Female": 12011, "Male": 18089},
       "per_race_gender": {"White": {"Female": 1780, "Male": 2520}, "Middle Eastern": {"Female": 1331, "Male": 2969},
                           "Black": {"Female": 8900, "Male": 12600}}}


@pytest.fixture
def mixed_model(tmp_path):
    """A copy of the shipped default whose config records a training mix."""
    model = tmp_path / "mixed"
    shutil.copytree(resolve("default"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "training_mix": MIX}))
    return model


def test_training_mix_in_config_summary_and_model_card(mixed_model):
    from facerace.training.modelcard import write_model_card

    config = load_config(mixed_model)
    assert config.training_mix == MIX
    assert config.mix_summary() == "FairFace train: 30,100 faces, 12,011 women and 18,089 men"
    card = write_model_card(mixed_model, config, [], "python scripts/build_model.py default").read_text()
    assert "| class | women | men | all |" in card and "| Middle Eastern | 1,331 | 2,969 | 4,300 |" in card
    assert "| all | 12,011 | 18,089 | 30,100 |" in card
    assert "Women are fewer in the training data (40% of the faces of known gender)." in card
    assert "The smallest class x gender group is Middle Eastern women (1,331 faces)" in card
    assert "male faces only**" not in card
    old = ModelConfig.from_dict({**config.to_dict(), "training_mix": None})  # a model saved before the mix was kept
    assert "not recorded" in write_model_card(mixed_model, old, [], "x").read_text()


@pytest.mark.parametrize("mix", ["many", {"data": ["x"]}, {**MIX, "per_gender": {"Female": "12,011"}},
                                 {**MIX, "images": -1}, {**MIX, "per_race_gender": {"White": {"Female": 1.5}}}])
def test_a_malformed_training_mix_is_a_damaged_model(mixed_model, mix):
    config = json.loads((mixed_model / "config.json").read_text())
    (mixed_model / "config.json").write_text(json.dumps({**config, "training_mix": mix}))
    with pytest.raises(ModelIntegrityError, match="training_mix"):
        load_config(mixed_model)


def test_models_listing_states_the_training_mix(mixed_model, monkeypatch):
    import facerace.model as model_module

    code, out, _ = run_cli("models")  # the shipped models, both trained on women and men
    assert code == 0 and out.count("training mix: FairFace train: 30,100 faces, 12,011 women and 18,089 men") == 2
    monkeypatch.setattr(model_module, "shipped_dir", lambda name: mixed_model)
    code, out, _ = run_cli("models")
    assert code == 0 and "training mix: FairFace train: 30,100 faces, 12,011 women and 18,089 men" in out
    from fastapi.testclient import TestClient

    from facerace.apps.serve.app import create_app

    listed = TestClient(create_app()).get("/v1/models").json()["models"][0]
    assert listed["training_mix"] == MIX and listed["training_mix_summary"].startswith("FairFace train: 30,100")
    assert "path" not in listed and str(mixed_model) not in json.dumps(listed)


def test_datasets_check_counts_per_race_and_gender(tmp_path):
    from conftest import FIXTURES

    root = tmp_path / "ff"
    (root / "val").mkdir(parents=True)
    rows = [("Black", "Female"), ("Black", "Male"), ("Black", "Female"), ("Indian", "Male"), ("Indian", "")]
    lines = ["file,age,gender,race,service_test"]
    for i, (race, gender) in enumerate(rows):
        shutil.copy(FIXTURES / "354.jpg", root / "val" / f"{i}.jpg")
        lines.append(f"val/{i}.jpg,20-29,{gender},{race},False")
    (root / "fairface_label_val.csv").write_text("\n".join(lines) + "\n")
    from facerace.training.datasets import check_dataset

    report = check_dataset(f"fairface:{root}", progress=False)
    assert report["splits"]["val"]["per_race_gender"] == {"Black": {"Female": 2, "Male": 1},
                                                         "Indian": {"Male": 1, "unknown": 1}}
    code, out, _ = run_cli("datasets", "check", f"fairface:{root}", "--quiet")
    assert code == 0 and "class x gender:\n    Black: Female 2, Male 1\n    Indian: Male 1, unknown 1\n" in out


def test_one_gender_is_never_counted_as_two_groups(tmp_path):
    from conftest import FIXTURES

    from facerace.training.datasets import open_dataset, race_gender_counts

    genders = ["f", "Female", " WOMAN", "male", "", "N/A", "nonbinary"]
    lines = ["path,label,gender"]
    for i, gender in enumerate(genders):
        shutil.copy(FIXTURES / "354.jpg", tmp_path / f"{i}.jpg")
        lines.append(f"{i}.jpg,Black,{gender}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = open_dataset(f"csv:{tmp_path / 'labels.csv'}", "all")
    assert race_gender_counts(ds.samples) == {"Black": {"Female": 3, "Male": 1, "nonbinary": 1, "unknown": 2}}

"""`--balance`: group weights, a weighted head, and the setting end to end (config, CLI, refusals)."""

import json

import numpy as np
import pytest
from conftest import run_cli

from facerace.errors import InvalidParameterError
from facerace.head import HeadParams, RaceHead, group_weights
from facerace.training.config import TrainConfig
from facerace.training.datasets import Sample
from facerace.training.train import balance_groups, check_config


def test_group_weights_give_every_group_the_same_total_and_mean_one():
    groups = ["a"] * 90 + ["b"] * 10
    w = group_weights(groups)
    assert w.mean() == pytest.approx(1.0)
    assert w[:90].sum() == pytest.approx(w[90:].sum())


def test_balance_groups_are_class_or_class_and_gender():
    y = np.array([0, 0, 1])
    samples = [Sample("a.jpg", "White", "Female"), Sample("b.jpg", "White", "Male"), Sample("c.jpg", "Black", None)]
    assert balance_groups("none", y, samples) is None
    assert list(balance_groups("race", y, samples)) == ["0", "0", "1"]
    assert list(balance_groups("race,gender", y, samples)) == ["0|Female", "0|Male", "1|unknown"]


def _shifted_groups(seed: int):
    """Two groups whose classes depend on the feature in opposite ways; the minority is 10%."""
    rng = np.random.default_rng(seed)
    n, minority = 2000, 200
    f = rng.standard_normal(n)
    group = np.r_[np.zeros(n - minority), np.ones(minority)]
    y = np.where(group == 0, f > 0, f > 1.5).astype(int)
    x = np.c_[f, rng.standard_normal((n, 3))].astype(np.float32)
    return x, y, group


def test_weighted_head_raises_the_minority_groups_accuracy():
    x, y, group = _shifted_groups(0)
    xv, yv, gv = _shifted_groups(1)
    params = HeadParams(hidden=0, max_epochs=60, patience=60)

    def minority_accuracy(weighted: bool) -> float:
        kw = {"sample_weight": group_weights(group), "val_weight": group_weights(gv)} if weighted else {}
        head = RaceHead(("no", "yes"), params).fit(x, y, xv, yv, **kw)
        return float((head.predict(xv[gv == 1]) == yv[gv == 1]).mean())

    assert minority_accuracy(True) > minority_accuracy(False) + 0.1


def test_bad_weights_are_refused():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(InvalidParameterError, match="sample_weight"):
        RaceHead(("a", "b")).fit(x, np.array([0, 1, 0, 1]), x, np.array([0, 1, 0, 1]), sample_weight=np.array([1, -1, 1, 1]))


def test_balance_setting_is_checked_before_any_work():
    with pytest.raises(InvalidParameterError, match="--balance must be one of"):
        check_config(TrainConfig(data=("fairface:x",), balance="gender"))
    with pytest.raises(InvalidParameterError, match="--unfreeze"):
        check_config(TrainConfig(data=("fairface:x",), backbone="dlib-torch", unfreeze=1, balance="race"))
    code, _, err = run_cli("train", "--data", "fairface:x", "--balance", "age")
    assert code == 2 and "invalid choice" in err


def test_train_with_balance_records_it_and_resumes_with_it(tiny_fairface, tmp_path):
    run = tmp_path / "run"
    args = ["--data", f"fairface:{tiny_fairface}", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--workers", "1"]
    code, out, _ = run_cli("train", *args, "--out", run, "--max-epochs", 5, "--val-fraction", 0.34,
                           "--balance", "race,gender")
    assert code == 0 and "balance: race,gender" in out and "training mix: " in out and "21 faces" in out
    assert json.loads((run / "config.json").read_text())["balance"] == "race,gender"
    settings = json.loads((run / "config.json").read_text())
    settings.pop("environment")
    assert TrainConfig.from_dict(settings).balance == "race,gender"


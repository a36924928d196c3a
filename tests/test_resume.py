"""An interrupted training run (killed, or Ctrl-C) resumes with nothing recomputed and nothing corrupted."""

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, fixture_labels
from PIL import Image, ImageEnhance


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """56 distinct images (8 brightness variants of each fixture) in FairFace's layout."""
    root = tmp_path_factory.mktemp("ff")
    (root / "train").mkdir()
    lines = ["file,age,gender,race,service_test"]
    for r in fixture_labels():
        img = Image.open(FIXTURES / r["file"]).convert("RGB")
        for i in range(8):
            name = f"train/{r['file'][:-4]}_{i}.jpg"
            ImageEnhance.Brightness(img).enhance(0.7 + 0.08 * i).save(root / name, quality=95)
            lines.append(f"{name},{r['age']},{r['gender']},{r['race']},False")
    (root / "fairface_label_train.csv").write_text("\n".join(lines) + "\n")
    return root


def cached(cache) -> int:
    db = cache / "embeddings.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as con:
        try:
            return con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        except sqlite3.OperationalError:  # table not created yet
            return 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_training_resumes(dataset, tmp_path, sig):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "facerace", "train", "--data", f"fairface:{dataset}", "--cache-dir", str(cache),
           "--workers", "1", "--quiet", "--max-epochs", "5", "--val-fraction", "0.25"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "first")], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while cached(cache) == 0 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    before = cached(cache)
    assert 0 < before < 56, "the run should be stopped part-way"
    assert "Traceback" not in err
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err

    done = subprocess.run([*cmd, "--out", str(tmp_path / "second")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "second" / "metrics.json").read_text())["data"][f"fairface:{dataset}"]
    assert report["computed_now"] == 56 - before and report["used"] == 56
    assert cached(cache) == 56
